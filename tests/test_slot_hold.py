"""A track that ends while its faces are at inference (StreamSlot): its track.ended waits for those results,
so the identity they carry is still published, before track.ended; a result that never comes holds it only
for a while, and a stream's end releases everything."""

from __future__ import annotations

import numpy as np

from streamer.config import Settings
from streamer.match.recogniser import TrackRecogniser
from streamer.pipeline.slot import StreamSlot
from streamer.publish.events import TrackEnded, TrackStarted
from streamer.track.processor import ChipBatch, Step

STREAM = "cam"


class _Processor:
    stream = STREAM

    def end_all(self, reason: str) -> Step:
        return Step()


class _Source:
    def poll_status(self) -> list:
        return []


def _slot() -> StreamSlot:
    return StreamSlot(_Source(), _Processor(), TrackRecogniser.from_settings(STREAM, Settings(), None))


def _started(track: int) -> Step:
    return Step(events=[TrackStarted(stream=STREAM, frame=1, pts=0.0, track=track, box=(0, 0, 10, 10))])


def _ended(track: int, frame: int = 20) -> Step:
    event = TrackEnded(stream=STREAM, frame=frame, pts=frame / 30, track=track, box=(0, 0, 10, 10), duration=0.6,
                       frames=frame, reason="scene_cut")
    return Step(events=[event], ended=[track])


def _batch(tracks: tuple[int, ...], frame: int = 11) -> ChipBatch:
    n = len(tracks)
    return ChipBatch(stream=STREAM, frame=frame, pts=frame / 30, decoded_at=0.0, tracks=tracks,
                     boxes=np.tile(np.array([0, 0, 10, 10], np.float32), (n, 1)),
                     arrays={"chips": np.zeros((n, 8, 8, 3), np.uint8)})


def _results(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(n, 128)).astype(np.float32)
    return {"embedding": embedding / np.linalg.norm(embedding, axis=1, keepdims=True)}


def _holding(batches: int = 1, now: float = 0.0) -> StreamSlot:
    """A slot whose track 1 ended with `batches` batches of its faces still at inference: its end held."""
    slot = _slot()
    slot.apply(_started(1))
    for _ in range(batches):
        slot.submitted((1,))
    assert slot.apply(_ended(1), now=now) == []
    return slot


def _two_results(slot: StreamSlot) -> list:
    """Both batches of track 1's faces come back; nothing is released after the first. The events their
    votes give."""
    batch = _batch((1,))
    events = [e for e, _ in slot.recogniser.on_results(batch, _results(1))]
    assert slot.answered((1,)) == []
    return events + [e for e, _ in slot.recogniser.on_results(batch, _results(1))]


def test_an_end_waits_for_the_tracks_results_and_comes_after_them():
    slot = _holding(batches=2)  # held: two batches of its faces are still out
    events = _two_results(slot)
    assert [e.kind for e in events] == ["identity"], "the ended track's second vote still names it"
    released = slot.answered((1,))
    assert [type(e) for e in released] == [TrackEnded] and released[0].track == 1
    assert slot.recogniser.on_results(_batch((1,)), _results(1)) == []  # now it is gone
    assert not slot.in_flight


def test_an_end_without_faces_out_is_sent_at_once():
    slot = _slot()
    slot.apply(_started(2))
    slot.submitted((3,))
    out = slot.apply(_ended(2))
    assert [e.track for e in out] == [2]


def test_a_result_that_never_comes_holds_the_end_only_for_a_while():
    slot = _holding(now=100.0)
    assert slot.release_overdue(101.0, hold_s=3.0) == []
    released = slot.release_overdue(103.5, hold_s=3.0)
    assert [e.track for e in released] == [1] and not slot.in_flight


def test_the_streams_end_releases_every_held_end_before_ended():
    slot = _slot()
    for track in (1, 2):
        slot.apply(_started(track))
        slot.submitted((track,))
        assert slot.apply(_ended(track), now=0.0) == []
    events = slot.end(stopped=False)
    kinds = [(e.kind, getattr(e, "track", None)) for e in events]
    assert kinds[:2] == [("track.ended", 1), ("track.ended", 2)] and kinds[-1][0] == "stream.status"


def test_a_file_that_runs_out_waits_for_its_last_results_then_ends():
    """The input is over while a track's faces are at inference (a short file read faster than inference
    answers): its name still comes, then its track.ended, then the stream's "ended" (at once when nothing
    waits; after the hold when the result never comes)."""
    slot = _holding(batches=2)  # two batches out: one result is not enough
    assert slot.end(stopped=False, hold=True) == [] and slot.ending and not slot.ended
    votes = _two_results(slot)
    assert [e.kind for e in votes] == ["identity"], "the name the last results carry is published"
    tail = slot.answered((1,))
    assert [(e.kind, getattr(e, "status", None)) for e in tail] == [("track.ended", None), ("stream.status", "ended")]
    assert slot.ended and not slot.ending and tail[1].detail == "end of input"
    assert slot.end(stopped=False) == []  # once

    nothing_out = _slot()
    assert [e.status for e in nothing_out.end(stopped=False, hold=True)] == ["ended"] and nothing_out.ended

    never = _holding(now=50.0)
    assert never.end(stopped=False, hold=True) == []
    assert never.release_overdue(51.0, hold_s=3.0) == []
    late = never.release_overdue(53.5, hold_s=3.0)
    assert [e.kind for e in late] == ["track.ended", "stream.status"] and never.ended

    stopped = _holding()  # a held end, then the run stops: everything goes out now
    assert stopped.end(stopped=False, hold=True) == []
    assert [e.kind for e in stopped.end(stopped=True)] == ["track.ended", "stream.status"] and stopped.ended
