"""The pipeline's stages alone, without sockets or processes: the per-stream processor, the track
recogniser, the slot wiring them, the supervisor's track book and restart limit, the internal channels."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.config import Settings
from streamer.match.recogniser import TrackRecogniser
from streamer.match.voting import AttributeSmoother, IdentityVoter
from streamer.pipeline.messages import (
    WorkerFatal,
    WorkerStats,
    control_frames,
    event_frames,
    parse_control,
    parse_event_frames,
)
from streamer.pipeline.run import MAX_RESTARTS, RESTART_WINDOW_S, TrackBook, _Worker
from streamer.publish.events import Identity, TrackEnded, TrackStarted, TrackUpdated
from streamer.track.processor import ChipBatch, StreamProcessor
from streamer.types import Faces, Frame

H, W = 240, 320


class ScriptedDetector:
    """Returns the boxes scripted for each call, in order (a face that walks to the right)."""

    def __init__(self, script: list[list[tuple[float, float, float, float]]]) -> None:
        self.script = script
        self.calls = 0

    def detect(self, image: np.ndarray) -> Faces:
        boxes = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if not boxes:
            return Faces.empty()
        landmarks = [[[x1 + 0.3 * (x2 - x1), y1 + 0.4 * (y2 - y1)], [x1 + 0.7 * (x2 - x1), y1 + 0.4 * (y2 - y1)],
                      [(x1 + x2) / 2, y1 + 0.6 * (y2 - y1)], [x1 + 0.35 * (x2 - x1), y1 + 0.8 * (y2 - y1)],
                      [x1 + 0.65 * (x2 - x1), y1 + 0.8 * (y2 - y1)]] for x1, y1, x2, y2 in boxes]
        return Faces(boxes=boxes, scores=[0.95] * len(boxes), landmarks=landmarks)


def walking_face(frames: int, start: float = 40.0) -> list[list[tuple[float, float, float, float]]]:
    return [[(start + 2 * i, 60.0, start + 2 * i + 80, 160.0)] for i in range(frames)]


def prepare(image: np.ndarray, faces: Faces) -> dict[str, np.ndarray]:
    return {"chips": np.zeros((len(faces), 8, 8, 3), np.uint8)}


def frames(n: int, colour=(90, 120, 150), start: int = 0, fps: float = 30.0):
    rng = np.random.default_rng(0)
    for i in range(start, start + n):
        image = np.clip(np.full((H, W, 3), colour, np.int16) + rng.integers(-8, 8, (H, W, 3)), 0, 255)
        yield Frame(stream="cam", index=i, pts=i / fps, decoded_at=0.0, image=image.astype(np.uint8))


def settings(**sections) -> Settings:
    # ScriptedDetector answers by call, not by frame: detection on every (interval-th) frame, unless asked.
    return Settings(**{**sections, "detector": {"max_interval": None, **sections.get("detector", {})}})


def processor(script, **sections) -> StreamProcessor:
    return StreamProcessor.from_settings("cam", settings(**sections), ScriptedDetector(script), prepare)


def run(proc: StreamProcessor, frame_iter) -> list:
    return [proc.process(frame) for frame in frame_iter]


# -- the per-stream processor --------------------------------------------------------------------------
def test_track_is_born_after_min_hits_and_its_face_goes_to_inference():
    proc = processor(walking_face(10), tracker={"min_hits": 3})
    steps = run(proc, frames(10))
    started = [e for s in steps for e in s.events if isinstance(e, TrackStarted)]
    assert [(e.track, e.frame) for e in started] == [(1, 2)]
    first_chips = next(s.chips for s in steps if s.chips is not None)
    assert isinstance(first_chips, ChipBatch)
    assert first_chips.tracks == (1,) and first_chips.frame == 2 and first_chips.arrays["chips"].shape == (1, 8, 8, 3)
    assert proc.live_tracks == [1]


def test_track_updates_are_throttled_and_a_missing_face_ends_its_track():
    script = walking_face(70) + [[]] * 40
    proc = processor(script, tracker={"min_hits": 1, "max_missed": 5}, publish={"track_update_s": 1.0})
    steps = run(proc, frames(110))
    updates = [e for s in steps for e in s.events if isinstance(e, TrackUpdated)]
    assert [e.frame for e in updates] == [30, 60]  # one a second of stream time, 30 fps
    ended = [e for s in steps for e in s.events if isinstance(e, TrackEnded)]
    assert len(ended) == 1 and ended[0].reason == "left" and ended[0].frame == 69  # about its last sighting
    assert ended[0].frames == 70 and ended[0].duration == pytest.approx(69 / 30)
    assert [t for s in steps for t in s.ended] == [1]
    assert proc.live_tracks == []


def test_detector_interval_detects_every_nth_frame_only():
    detector = ScriptedDetector(walking_face(30))
    proc = StreamProcessor.from_settings("cam", settings(detector={"interval": 3}, tracker={"min_hits": 2}),
                                         detector, prepare)
    steps = run(proc, frames(30))
    assert detector.calls == 10
    assert proc.frames == 30
    skipped = [s for i, s in enumerate(steps) if i % 3]
    assert all(s.detections is None and not s.events and s.chips is None for s in skipped)
    started = [e for s in steps for e in s.events if isinstance(e, TrackStarted)]
    assert [e.frame for e in started] == [3]  # second detection (frame 3) confirms with min_hits=2


def test_scene_cut_ends_every_track_even_if_the_boxes_overlap():
    proc = processor(walking_face(40), tracker={"min_hits": 1})
    steps = run(proc, frames(20)) + run(proc, frames(20, colour=(20, 200, 40), start=20))
    ended = [e for s in steps for e in s.events if isinstance(e, TrackEnded)]
    assert [(e.track, e.reason, e.frame) for e in ended] == [(1, "scene_cut", 19)]
    started = [e.track for s in steps for e in s.events if isinstance(e, TrackStarted)]
    assert started == [1, 2]  # the face after the cut is a new track


def test_scene_cut_detection_can_be_turned_off():
    proc = processor(walking_face(40), tracker={"min_hits": 1, "scene_cut_threshold": 0})
    steps = run(proc, frames(20)) + run(proc, frames(20, colour=(20, 200, 40), start=20))
    assert not [e for s in steps for e in s.events if isinstance(e, TrackEnded)]


def test_end_all_ends_live_tracks_with_the_reason_and_ids_continue():
    proc = processor(walking_face(10), tracker={"min_hits": 1})
    run(proc, frames(5))
    step = proc.end_all("source_lost")
    assert [(e.track, e.reason) for e in step.events] == [(1, "source_lost")] and step.ended == [1]
    steps = run(proc, frames(5, start=5))
    started = [e.track for s in steps for e in s.events if isinstance(e, TrackStarted)]
    assert started == [2]  # never reused on the stream


def test_first_track_id_continues_a_previous_worker():
    proc = StreamProcessor.from_settings("cam", settings(tracker={"min_hits": 1}), ScriptedDetector(walking_face(5)),
                                         prepare, first_track_id=41)
    steps = run(proc, frames(5))
    assert [e.track for s in steps for e in s.events if isinstance(e, TrackStarted)] == [41]
    assert proc.next_track_id == 42


def test_chip_batch_checks_its_rows():
    with pytest.raises(ValueError, match="rows"):
        ChipBatch("cam", 0, 0.0, 0.0, (1, 2), np.zeros((2, 4), np.float32), {"chips": np.zeros((1, 8, 8, 3))})


# -- the track recogniser ---------------------------------------------------------------------------------
class GalleryOf:
    """A matcher stand-in with the Matcher interface: name by the first embedding value."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names

    def match(self, embeddings):
        from streamer.match.matcher import Match

        out = []
        for row in embeddings:
            name = self.names.get(int(row[0]))
            out.append(Match(name, 0.3 if name else 0.9, 0.75 if name else 0.25))
        return out


def batch(tracks, frame=5) -> ChipBatch:
    return ChipBatch("cam", frame, frame / 30, 0.0, tuple(tracks), np.tile([[10.0, 10, 50, 60]], (len(tracks), 1)),
                     {"chips": np.zeros((len(tracks), 8, 8, 3), np.uint8)})


def results(codes, with_attributes=False):
    arrays = {"embedding": np.array([[c] + [0.0] * 127 for c in codes], np.float32)}
    if with_attributes:
        n = len(codes)
        arrays.update(age=np.full(n, 30.0, np.float32), gender=np.full(n, 0.9, np.float32),
                      emotion=np.tile(np.eye(7, dtype=np.float32)[3], (n, 1)))
    return arrays


def recogniser(names=None, **kwargs) -> TrackRecogniser:
    return TrackRecogniser("cam", GalleryOf(names or {1: "ada"}), IdentityVoter(min_votes=2), AttributeSmoother(),
                           **kwargs)


def test_identity_is_announced_after_enough_votes_with_its_fields():
    rec = recogniser()
    rec.started(7)
    assert rec.on_results(batch([7]), results([1])) == []
    events = rec.on_results(batch([7], frame=9), results([1]))
    (identity, crop), = events
    assert isinstance(identity, Identity) and crop is None
    assert (identity.track, identity.name, identity.frame, identity.votes) == (7, "ada", 9, {"ada": 2})
    assert identity.embedding is None and identity.seq == 0
    assert rec.tracks[7].name == "ada" and rec.tracks[7].known


def test_results_for_an_ended_track_are_dropped():
    rec = recogniser()
    rec.started(7)
    rec.started(8)
    rec.on_results(batch([7, 8]), results([1, 1]))
    rec.ended(8)  # ended while its second face was in flight
    events = rec.on_results(batch([7, 8]), results([1, 1], with_attributes=True))
    assert {e.track for e, _ in events} == {7}
    assert rec.dropped_for_ended == 1 and 8 not in rec.tracks
    assert len(rec.voter) == 1 and len(rec.smoother) == 1  # no state left behind for track 8


def test_unknown_faces_without_a_gallery_and_embeddings_only_when_enabled():
    rec = TrackRecogniser("cam", None, IdentityVoter(min_votes=1), AttributeSmoother(), include_embeddings=True)
    rec.started(3)
    (identity, _), = rec.on_results(batch([3]), results([5]))
    assert identity.name is None and identity.distance is None and identity.votes == {"unknown": 1}
    assert identity.embedding is not None and len(identity.embedding) == 128


def test_attributes_are_smoothed_and_crops_follow_identities():
    rec = recogniser()
    rec.started(1)
    rec.on_results(batch([1]), results([1], with_attributes=True), crops=[b"\xff\xd8a"])
    events = rec.on_results(batch([1]), results([1], with_attributes=True), crops=[b"\xff\xd8b"])
    kinds = [(e.kind, c) for e, c in events]
    assert kinds == [("identity", b"\xff\xd8b"), ("attributes", None)]
    attributes = events[1][0]
    assert attributes.age == 30.0 and attributes.gender.label == "man" and attributes.emotion.label == "happy"


# -- the supervisor's bookkeeping ---------------------------------------------------------------------------
def test_track_book_ends_orphans_and_continues_ids():
    book = TrackBook()
    book.observe(TrackStarted(stream="a", frame=3, pts=0.1, track=4, box=(0, 0, 10, 10)))
    book.observe(TrackUpdated(stream="a", frame=33, pts=1.1, track=4, box=(5, 0, 15, 10)))
    book.observe(TrackStarted(stream="b", frame=1, pts=0.0, track=1, box=(0, 0, 10, 10)))
    book.observe(TrackEnded(stream="b", frame=2, pts=0.05, track=1, box=(0, 0, 10, 10), duration=0.05, frames=2))
    book.reported("b", 9)  # the worker had handed out ids to tracks not confirmed yet
    assert book.next_ids() == {"a": 5, "b": 9}
    orphans = book.orphaned()
    assert [(e.stream, e.track, e.reason, e.frames, e.box, e.frame) for e in orphans] == [
        ("a", 4, "worker_restart", None, (5, 0, 15, 10), 33)]
    assert orphans[0].duration == pytest.approx(1.0)
    assert book.orphaned() == []


def test_restart_limit_counts_crashes_in_a_sliding_window():
    now = [0.0]
    worker = _Worker("detect", target=None, args=lambda: (), clock=lambda: now[0])
    for _ in range(MAX_RESTARTS):
        assert worker.may_restart()
        now[0] += 1
    assert not worker.may_restart()  # one more within the window: not transient
    now[0] += RESTART_WINDOW_S + 1
    assert worker.may_restart()  # old crashes have left the window


# -- internal channels ---------------------------------------------------------------------------------
def test_event_envelope_round_trip_and_rejections():
    event = TrackStarted(stream="cam", frame=1, pts=0.5, track=2, box=(1, 2, 3, 4))
    parsed, meta, crop = parse_event_frames(event_frames(event, 12.5, b"\xff\xd8jpeg"))
    assert parsed == event and meta.decoded_at == 12.5 and crop == b"\xff\xd8jpeg"
    good = event_frames(event)
    bad = [
        ([good[0]], "2 or 3 frames"),
        ([b"{}", b"{}"], "validation error"),
        ([b'{"decoded_at": "x"}', good[1]], "envelope"),
        ([good[0], good[1], b"not a jpeg"], "JPEG"),
        ([good[0], event.model_copy(update={"seq": 4}).payload()], "unpublished"),
    ]
    for frames, fragment in bad:
        with pytest.raises(ValueError, match=fragment):
            parse_event_frames(frames)


def test_control_messages_round_trip_and_reject_garbage():
    stats = WorkerStats(worker="detect", faces_sent=3)
    assert parse_control(control_frames(stats)) == stats
    fatal = WorkerFatal(worker="inference", message="model yunet: not found")
    assert parse_control(control_frames(fatal)) == fatal
    for frames in ([], [b"x"], [b'{"type": "stats", "worker": "d", "extra": 1}'], [b"{}", b"{}"]):
        with pytest.raises(ValueError):
            parse_control(frames)
