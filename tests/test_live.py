"""The pipeline side of `streamer serve`: taps, live tiles, sources added and removed at run time, the
commands channel. A real Supervisor (in a thread of this process, as `streamer serve` runs it) with real
workers, models and clips played as live cameras, and a real ZeroMQ subscriber on the public socket."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from streamer.config import SourceSettings, load_settings
from streamer.errors import InputError
from streamer.pipeline.live import FrameHub, LiveRenderer, redact_url
from streamer.pipeline.messages import (
    LiveFrameMeta,
    live_frame_frames,
    parse_command,
    parse_live_frame,
)
from streamer.publish.subscriber import EventSubscriber

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_videos" / "astronaut.mp4"
LIVE_FPS = 4.0
LIVE_WIDTH = 480

pytestmark = pytest.mark.slow


def free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class Pipeline:
    """The supervisor running in a thread, with what its tap and a public subscriber saw."""

    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor
        self.tapped: deque = deque()  # (event, crop) as the tap got them
        self.public: deque = deque()  # WireMessages from the public socket
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.subscriber = EventSubscriber(supervisor.publisher.endpoint, timeout_ms=100)
        supervisor.add_tap(lambda event, crop: self.tapped.append((event, crop)), wants_crops=True)
        supervisor.add_tap(self._broken_tap)
        self.thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self.reader = threading.Thread(target=self._read, name="subscriber", daemon=True)

    def _broken_tap(self, event, crop) -> None:
        raise RuntimeError("a tap with a bug")

    def _run(self) -> None:
        try:
            self.supervisor.run()
        except BaseException as exc:
            self.error = exc

    def _read(self) -> None:
        while not self._stop.is_set():
            message = self.subscriber.receive_message(100)
            if message is not None:
                self.public.append(message)

    def start(self) -> None:
        self.reader.start()
        time.sleep(0.3)  # the subscription reaches the publisher before the first event
        self.thread.start()

    def wait_event(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event, crop in list(self.tapped):
                if predicate(event, crop):
                    return event, crop
            assert self.thread.is_alive(), f"the supervisor stopped: {self.error!r}"
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def live_frames(self, stream: str) -> int:
        return self.supervisor.summary.last_stats.get("streams", {}).get(stream, {}).get("live_frames", 0)

    def stop(self) -> None:
        self.supervisor.request_stop()
        self.thread.join(60)
        self._stop.set()
        self.reader.join(5)
        self.subscriber.close()


@pytest.fixture(scope="module")
def pipeline(model_dir, cache_dir, lin_gallery):
    settings = load_settings(overrides={
        "model_dir": str(model_dir),
        "models": {"cache_dir": str(cache_dir)},
        "gallery": {"path": str(lin_gallery)},
        "publish": {"endpoint": free_endpoint(), "heartbeat_s": 1.0},
        "sources": [{"url": str(SAMPLE), "id": "cam_a", "live": True, "loop": True}],
        "serve": {"live_fps": LIVE_FPS, "live_max_width": LIVE_WIDTH},
    })
    from streamer.pipeline.run import Supervisor

    run = Pipeline(Supervisor(settings, keep_running=True))
    run.start()
    try:
        run.wait_event(lambda e, c: e.kind == "stream.status" and e.stream == "cam_a" and e.status == "connected",
                       90, "cam_a connected")
        yield run
    finally:
        run.stop()
    assert not run.thread.is_alive(), "the supervisor did not stop"
    assert run.error is None, repr(run.error)


def test_watched_stream_gets_changing_tiles_at_most_live_fps(pipeline):
    hub = pipeline.supervisor.frames
    assert pipeline.live_frames("cam_a") == 0, "nothing may be encoded before anyone watches"
    assert hub.latest("cam_a") is None
    tiles = []
    with hub.watch("cam_a"):
        first = hub.wait_next("cam_a", after=0, timeout=15)
        assert first is not None, "no tile within 15 s of watching"
        tiles.append(first)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            tile = hub.wait_next("cam_a", after=tiles[-1].index, timeout=2)
            if tile is not None:
                tiles.append(tile)
    assert all(b.index > a.index for a, b in pairwise(tiles))
    span = tiles[-1].received_at - tiles[0].received_at
    assert len(tiles) >= 6, f"only {len(tiles)} tiles in {span:.1f} s"
    assert (len(tiles) - 1) / span <= LIVE_FPS * 1.15, f"{len(tiles)} tiles in {span:.2f} s: over {LIVE_FPS}/s"
    images = [cv2.imdecode(np.frombuffer(t.jpeg, np.uint8), cv2.IMREAD_COLOR) for t in tiles]
    assert all(image is not None and image.shape[1] == LIVE_WIDTH for image in images), "tiles are downscaled JPEGs"
    assert [t.frame for t in tiles] == sorted(t.frame for t in tiles) and tiles[-1].frame > tiles[0].frame
    changed = max(float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in pairwise(images))
    assert changed > 2.0, "the tiles do not change over time"
    latencies = [t.received_at - t.decoded_at for t in tiles]
    assert all(0 <= latency < 2.0 for latency in latencies), latencies
    assert all(t.decoded_at <= t.encoded_at <= t.received_at for t in tiles)
    # Once nobody watches, the encoding stops (the worker's counter is reported once a second).
    time.sleep(1.5)
    stopped_at = pipeline.live_frames("cam_a")
    assert stopped_at >= len(tiles)
    time.sleep(2.5)
    assert pipeline.live_frames("cam_a") == stopped_at, "tiles were still encoded after the last viewer left"


def test_source_added_and_removed_at_run_time(pipeline, media_dir):
    supervisor = pipeline.supervisor
    clip = media_dir / "face_recognition/examples/short_hamilton_clip.mp4"
    assert supervisor.add_source(SourceSettings(url=str(clip), id="stage", live=True, loop=True)) == "stage"
    with pytest.raises(InputError, match="in use"):
        supervisor.add_source(SourceSettings(url=str(clip), id="stage"))
    with pytest.raises(InputError, match="unsupported scheme"):
        supervisor.add_source({"url": "ftp://camera/stream"})
    with pytest.raises(InputError, match="no such video file"):
        supervisor.add_source({"url": "/nonexistent/clip.mp4"})
    with pytest.raises(InputError, match="stream id"):
        supervisor.add_source({"url": str(clip), "id": "a/b"})
    with pytest.raises(InputError, match="no stream"):
        supervisor.remove_source("nope")
    assert [v.id for v in supervisor.streams()] == ["cam_a", "stage"]
    pipeline.wait_event(lambda e, c: e.kind == "stream.status" and e.stream == "stage" and e.status == "connected",
                        30, "stage connected")
    pipeline.wait_event(lambda e, c: e.kind == "identity" and e.stream == "stage" and e.name == "Lin-Manuel Miranda",
                        60, "Lin-Manuel Miranda named on the added stream")
    views = {v.id: v for v in supervisor.streams()}
    assert views["stage"].status == "connected" and views["stage"].live and views["stage"].url == str(clip)
    deadline = time.monotonic() + 5
    while supervisor.streams()[1].frames == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert supervisor.streams()[1].frames > 0
    assert pipeline.live_frames("stage") == 0, "a stream nobody watches must not be encoded"

    supervisor.remove_source("stage")
    assert [v.id for v in supervisor.streams()] == ["cam_a"]
    ended, _ = pipeline.wait_event(lambda e, c: e.kind == "stream.status" and e.stream == "stage"
                                   and e.status == "ended", 20, "stage ended")
    assert ended.detail == "removed"
    time.sleep(0.5)
    events = [e for e, _ in pipeline.tapped if e.stream == "stage"]
    started = {e.track for e in events if e.kind == "track.started"}
    finished = {e.track for e in events if e.kind == "track.ended"}
    assert started and started == finished, "every track of a removed stream ends"
    by_seq = {e.seq: e for e, _ in pipeline.tapped}
    seq = ended.seq - 1  # the tracks live at the removal end right before the stream, as "stopped"
    while (e := by_seq.get(seq)) is not None and e.kind == "track.ended" and e.stream == "stage":
        assert e.reason == "stopped", e
        seq -= 1
    assert not [e for e in events if e.seq > ended.seq], "nothing of a removed stream after its end"
    # The same id may come back; its track ids go on where they were.
    assert supervisor.add_source({"url": str(clip), "id": "stage", "live": True, "loop": True}) == "stage"
    restarted, _ = pipeline.wait_event(lambda e, c: e.kind == "track.started" and e.stream == "stage"
                                       and e.seq > ended.seq, 30, "a track on the stream added again")
    assert restarted.track > max(started)
    supervisor.remove_source("stage")


def test_crop_tap_gets_crops_and_the_public_socket_none(pipeline):
    pipeline.wait_event(lambda e, c: e.kind == "identity" and c is not None, 60, "an identity event with a crop")
    time.sleep(0.5)
    identities = [(e, c) for e, c in pipeline.tapped if e.kind == "identity"]
    assert identities and all(c is not None and c[:2] == b"\xff\xd8" for _, c in identities)
    assert all(c is None for e, c in pipeline.tapped if e.kind != "identity")
    assert all(e.seq is not None and e.crop is None for e, _ in identities), "the event as published: no crop flag"
    public = [m for m in pipeline.public if m.topic.startswith(b"identity.")]
    assert public, "the subscriber saw no identity event"
    for message in pipeline.public:
        assert message.crop is None and "crop" not in json.loads(message.payload)
    assert pipeline.subscriber.invalid == 0
    # A tap that raises is logged and never stops the run (the broken tap sees every event too).
    assert pipeline.thread.is_alive()


def test_bad_commands_and_frames_are_refused_without_crashing(pipeline):
    supervisor = pipeline.supervisor
    pid = supervisor.detect.process.pid
    before = supervisor.summary.frames
    for frames in ([b"not json"], [b'{"type": "watch", "stream": ""}'], [b'{"type": "explode"}'],
                   [b'{"type": "add_source", "source": {"url": "x"}}'], [b"a", b"b"], [b"{" * 100_000]):
        supervisor._outbox.append(frames)  # what a broken or hostile supervisor could send
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(supervisor.frames_endpoint)
    meta = LiveFrameMeta(stream="cam_a", frame=1, pts=0.0, decoded_at=0.0, encoded_at=0.0)
    for frames in ([b"{}", b"\xff\xd8x"], live_frame_frames(meta, b"not a jpeg"), [b"only one"],
                   [meta.model_dump_json().encode(), b"\xff\xd8" + b"x" * (9 << 20)]):
        push.send_multipart(frames)
    time.sleep(2.5)
    push.close()
    assert supervisor.frames.latest("cam_a") is None or supervisor.frames.latest("cam_a").frame != 1
    assert pipeline.thread.is_alive() and supervisor.detect.process.pid == pid and supervisor.detect.alive
    assert supervisor.summary.restarts["detect"] == 0
    assert supervisor.summary.frames > before, "the stream stopped"


def test_idle_without_sources_keeps_running(pipeline):
    supervisor = pipeline.supervisor
    supervisor.remove_source("cam_a")
    ended, _ = pipeline.wait_event(lambda e, c: e.kind == "stream.status" and e.stream == "cam_a"
                                   and e.status == "ended", 20, "cam_a ended")
    assert supervisor.streams() == []
    pipeline.wait_event(lambda e, c: e.kind == "heartbeat" and e.seq > ended.seq + 1 and not e.streams, 10,
                        "a heartbeat of the idle pipeline")
    assert pipeline.thread.is_alive() and supervisor.detect.alive


# -- units (no pipeline) ----------------------------------------------------------------------------------------
def test_messages_validate_on_receipt():
    for frames in ([b"{}"], [b'{"type": "watch", "stream": "a", "ttl_s": 1e9}'], [b"x", b"y"]):
        with pytest.raises(ValueError, match="command"):
            parse_command(frames)
    meta = LiveFrameMeta(stream="a", frame=3, pts=0.1, decoded_at=1.0, encoded_at=1.1)
    assert parse_live_frame(live_frame_frames(meta, b"\xff\xd8\xff"))[0] == meta
    for frames in (live_frame_frames(meta, b"GIF89a"), live_frame_frames(meta, b""), [b"{}", b"\xff\xd8"]):
        with pytest.raises(ValueError, match="live frame"):
            parse_live_frame(frames)


def test_redact_url():
    assert redact_url("rtsp://admin:secret@10.0.0.5:554/stream1") == "rtsp://admin:***@10.0.0.5:554/stream1"
    assert redact_url("rtsp://10.0.0.5/stream1") == "rtsp://10.0.0.5/stream1"
    assert redact_url("/videos/clip.mp4") == "/videos/clip.mp4"


def test_frame_hub_waits_and_counts_watchers():
    hub = FrameHub()
    assert hub.wait_next("a", after=0, timeout=0.05) is None
    with hub.watch("a"), hub.watch("a"):
        assert hub.watched() == {"a"} and hub.watchers("a") == 2
    assert hub.watched() == frozenset()
    threading.Timer(0.1, lambda: hub.put("a", 7, 0.2, 1.0, 1.1, b"\xff\xd8")).start()
    tile = hub.wait_next("a", after=0, timeout=5)
    assert tile is not None and tile.index == 1 and tile.frame == 7 and hub.latest("a") is tile
    assert hub.wait_next("a", after=1, timeout=0.05) is None
    hub.forget("a")
    assert hub.latest("a") is None


def test_renderer_rate_and_size():
    renderer = LiveRenderer(fps=5, max_width=320, blur_unknown=True)
    sent = [t for t in np.arange(0, 10, 1 / 30) if renderer.due("a", float(t))]
    assert 48 <= len(sent) <= 51 and min(np.diff(sent)) >= 0.1
    jpeg = renderer.render(np.zeros((720, 1280, 3), np.uint8), None, [])
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (180, 320, 3)
