"""Video sources against real inputs: the sample clip, lavfi test sources, corrupt files, and a real GStreamer
RTSP server on 127.0.0.1 that is killed, restarted and frozen underneath a reading source."""

from __future__ import annotations

import functools
import http.server
import random
import threading
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from rtsp_server import RtspServer, free_port, rtsp_server_unavailable

from streamer.config import ReconnectSettings, SourceSettings
from streamer.errors import SourceError
from streamer.sources import (
    PyAVSource,
    Source,
    StatusChange,
    WebcamSource,
    backoff_delays,
    open_source,
    parse_url,
)

CLIP_FRAMES = 275
FAST = ReconnectSettings(initial_delay_s=0.2, max_delay_s=1.0, frame_timeout_s=2.0, open_timeout_s=3.0)


@pytest.fixture(scope="module")
def clip(media_dir) -> Path:
    return media_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"


def read_all(source: Source, timeout: float = 5.0) -> list:
    frames = []
    while (frame := source.read(timeout)) is not None:
        frames.append(frame)
    return frames


def wait_for_status(source: Source, want: str, within: float, seen: list[StatusChange]) -> float:
    """Read (and discard) frames until `want` is reported; returns when it was seen (monotonic)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for change in source.poll_status():
            seen.append(change)
            if change.status == want:
                return time.monotonic()
        source.read(0.05)
    pytest.fail(f"no {want!r} within {within} s; saw {[(c.status, c.detail) for c in seen]}")


# ----------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "kind", "target", "live"),
    [
        ("/data/a.mp4", "file", "/data/a.mp4", False),
        ("file:///data/my%20clip.mp4", "file", "/data/my clip.mp4", False),
        ("rtsp://user:pw@cam.local:554/stream1", "rtsp", "rtsp://user:pw@cam.local:554/stream1", True),
        ("rtsps://cam/s", "rtsp", "rtsps://cam/s", True),
        ("https://host/live.m3u8", "http", "https://host/live.m3u8", True),
        ("0", "webcam", "0", True),
        ("webcam:2", "webcam", "2", True),
        ("/dev/video1", "webcam", "1", True),
        ("lavfi:testsrc2=size=1280x720:rate=30", "lavfi", "testsrc2=size=1280x720:rate=30", True),
    ],
)
def test_parse_url(url, kind, target, live):
    parsed = parse_url(url)
    assert (parsed.kind, parsed.target, parsed.live) == (kind, target, live)


@pytest.mark.parametrize("url", ["", "  ", "ftp://host/a.mp4", "lavfi:"])
def test_bad_urls_raise_source_error(url):
    with pytest.raises(SourceError):
        parse_url(url)


def test_backoff_doubles_up_to_the_cap_with_a_little_jitter():
    settings = ReconnectSettings(initial_delay_s=0.5, max_delay_s=4.0)
    delays = backoff_delays(settings, random.Random(1))
    got = [next(delays) for _ in range(7)]
    for delay, nominal in zip(got, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]):
        assert 0.9 * nominal <= delay <= min(1.1 * nominal, 4.0)
    assert len(set(got)) == len(got)  # jittered


# ----------------------------------------------------------------------------- files


def test_file_delivers_every_frame_in_order(clip):
    source = open_source(SourceSettings(url=str(clip)), "cam0", ReconnectSettings())
    assert not source.live
    source.start()
    try:
        frames = read_all(source)
        assert len(frames) == CLIP_FRAMES
        assert [f.index for f in frames] == list(range(CLIP_FRAMES))
        first = frames[0]
        assert first.stream == "cam0" and first.image.shape == (360, 640, 3) and first.image.dtype == np.uint8
        assert first.image.flags.c_contiguous
        pts = np.array([f.pts for f in frames])
        assert np.all(np.diff(pts) > 0)
        # 29.97 fps from the stream's time base (the clip starts at 0.852 s)
        assert np.median(np.diff(pts)) == pytest.approx(1001 / 30000, abs=1e-4)
        assert pts[0] == pytest.approx(10214 / 11988, abs=1e-6)
        assert all(a.decoded_at <= b.decoded_at for a, b in zip(frames, frames[1:]))
        assert source.finished
        assert source.read(0.01) is None
        stats = source.stats
        assert (stats.frames, stats.dropped, stats.status) == (CLIP_FRAMES, 0, "ended")
        assert [c.status for c in source.poll_status()] == ["connected", "ended"]
        assert source.poll_status() == []
    finally:
        source.stop()


def test_source_images_are_pyavs_own_bgr_conversion(clip):
    """The reader's reused single-threaded converter (BgrConverter) gives exactly the pixels of PyAV's
    per-frame `to_ndarray(format="bgr24")`, on every frame (detections and names must not move)."""
    with av.open(str(clip)) as container:
        expected = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    source = open_source(SourceSettings(url=str(clip)), "cam0", ReconnectSettings())
    source.start()
    try:
        images = [frame.image for frame in read_all(source)]
    finally:
        source.stop()
    assert len(images) == len(expected) == CLIP_FRAMES
    assert all(np.array_equal(a, b) for a, b in zip(images, expected))


def test_file_sampled_to_target_fps(clip):
    source = open_source(SourceSettings(url=f"file://{clip}", fps=10), "cam0", ReconnectSettings())
    with source:
        frames = read_all(source)
    pts = np.array([f.pts for f in frames])
    duration = CLIP_FRAMES * 1001 / 30000
    assert abs(len(frames) - duration * 10) <= 1.5
    gaps = np.diff(pts)
    assert gaps.min() >= 0.1 - 1001 / 30000 and gaps.max() <= 0.1 + 1001 / 30000
    assert np.mean(gaps) == pytest.approx(0.1, abs=0.005)


def test_file_loop_keeps_pts_increasing(clip):
    with open_source(SourceSettings(url=str(clip), loop=True), "cam0", ReconnectSettings()) as source:
        frames = [source.read(5.0) for _ in range(CLIP_FRAMES + 30)]
        assert not source.finished
    assert all(f is not None for f in frames)
    pts = np.array([f.pts for f in frames])
    assert np.all(np.diff(pts) > 0)
    assert np.diff(pts).max() < 0.05  # no jump at the seam
    assert np.array_equal(frames[CLIP_FRAMES].image, frames[0].image)  # the replay starts over


def test_file_backpressure_and_stop_never_deadlocks(clip):
    source = open_source(SourceSettings(url=str(clip)), "cam0", ReconnectSettings())
    source.start()
    time.sleep(0.5)  # the reader fills its small queue and blocks
    blocked_at = source.stats.frames
    assert blocked_at <= PyAVSource.queue_size + 2
    time.sleep(0.2)
    assert source.stats.frames == blocked_at and source.stats.dropped == 0
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1.0
    assert source.finished and source.read(0.01) is None
    source.stop()  # idempotent
    assert source.poll_status()[-1].status == "ended"


def _bad_file(kind: str, folder: Path, clip: Path) -> Path:
    path = folder / ("tone.wav" if kind == "audio-only" else f"{kind}.mp4")
    if kind == "text":
        path.write_text("not a video\n" * 50)
    elif kind == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(50_000))
    elif kind == "truncated":
        path.write_bytes(clip.read_bytes()[:200_000])  # the index (moov) sits at the end of this clip
    elif kind == "audio-only":
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(b"\0\0" * 8000)
    return path  # "missing": never written


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("text", "cannot open"),
        ("random-bytes", "cannot open"),
        ("truncated", "cannot open"),
        ("audio-only", "no video stream"),
    ],
)
def test_bad_files_fail_fast_with_one_line(tmp_path, clip, kind, message):
    path = _bad_file(kind, tmp_path, clip)
    with pytest.raises(SourceError) as caught:
        source = open_source(SourceSettings(url=str(path)), "cam0", ReconnectSettings())
        source.start()
        source.stop()
    text = str(caught.value)
    assert message in text and str(path) in text and "\n" not in text


def test_video_without_decodable_frames_fails_at_start(tmp_path, clip):
    data = bytearray(clip.read_bytes())
    start, end = data.find(b"mdat") + 4, data.find(b"moov") - 4  # keep the index, ruin every frame
    data[start:end] = random.Random(0).randbytes(end - start)
    path = tmp_path / "ruined.mp4"
    path.write_bytes(bytes(data))
    source = open_source(SourceSettings(url=str(path)), "cam0", ReconnectSettings())
    with pytest.raises(SourceError, match="no decodable video frame"):
        source.start()


@pytest.fixture()
def http_root(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving tmp_path (no Range support, so streamable formats only)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_stream_read_as_a_remote_file(http_root, clip):
    folder, base = http_root
    with av.open(str(clip)) as mp4, av.open(str(folder / "clip.ts"), "w", format="mpegts") as ts:
        video = ts.add_stream_from_template(mp4.streams.video[0])
        for packet in mp4.demux(mp4.streams.video[0]):
            if packet.dts is not None:
                packet.stream = video
                ts.mux(packet)
    settings = SourceSettings(url=f"{base}/clip.ts", live=False)
    with open_source(settings, "web", ReconnectSettings()) as source:
        frames = read_all(source)
    assert len(frames) == CLIP_FRAMES and frames[0].image.shape == (360, 640, 3)
    with pytest.raises(SourceError, match="404"):
        open_source(SourceSettings(url=f"{base}/nope.ts", live=False), "web", ReconnectSettings()).start()


# ----------------------------------------------------------------------------- live: lavfi, webcam backend


def test_live_source_drops_frames_for_a_slow_consumer():
    settings = SourceSettings(url="lavfi:testsrc2=size=320x240:rate=30", id="synthetic")
    with open_source(settings, "synthetic", FAST) as source:
        assert source.live
        assert source.read(5.0) is not None
        got = []
        for _ in range(6):
            time.sleep(0.2)  # a consumer much slower than 30 fps
            got.append(source.read(1.0))
        stats = source.stats
    assert all(f is not None for f in got)
    assert all(0 <= time.monotonic() - f.decoded_at < 2.0 for f in got)
    gaps = np.diff([f.index for f in got])
    assert gaps.min() >= 3  # newest frame wins: ~6 frames pass between reads at 30 fps
    assert stats.dropped >= 20
    # every produced frame was either read or dropped (at most one unread in the slot)
    assert stats.frames - stats.dropped - (1 + len(got)) in (0, 1)
    assert 20 <= stats.fps <= 40  # lavfi is paced to its own rate, not decoded as fast as possible


def test_lavfi_with_a_bad_graph_fails_fast():
    source = open_source(SourceSettings(url="lavfi:nosuchfilter=size=10x10"), "cam0", FAST)
    with pytest.raises(SourceError, match="cannot open"):
        source.start()


def test_live_source_retries_an_unreachable_server_and_stops_promptly():
    url = f"rtsp://127.0.0.1:{free_port()}/nothing"  # nobody listens: connection refused
    source = open_source(SourceSettings(url=url), "cam0", FAST)
    source.start()
    seen: list[StatusChange] = []
    wait_for_status(source, "lost", 5.0, seen)
    assert "open failed" in seen[-1].detail
    time.sleep(1.0)  # several retries, still one "lost"
    assert [c.status for c in source.poll_status()] == []
    assert source.stats.status == "lost" and source.stats.frames == 0
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1.0
    assert source.finished


def test_webcam_backend_reconnects(clip):
    """No camera exists here: the OpenCV backend reads the clip as its "device", and the end of the clip
    plays the part of an unplugged camera."""
    source = WebcamSource("cam0", "webcam:0", device=str(clip), reconnect=FAST)
    seen: list[StatusChange] = []
    with source:
        wait_for_status(source, "connected", 5.0, seen)
        frame = source.read(2.0)
        assert frame is not None and frame.image.shape == (360, 640, 3)
        time.sleep(0.1)  # not reading: the one-slot mailbox drops
        assert source.stats.dropped > 0
        wait_for_status(source, "lost", 5.0, seen)
        wait_for_status(source, "reconnected", 5.0, seen)
        assert source.read(2.0) is not None
        stats = source.stats
    assert stats.reconnects >= 1
    assert source.finished


# ----------------------------------------------------------------------------- a real RTSP server


@pytest.fixture(scope="module")
def rtsp_available() -> None:
    reason = rtsp_server_unavailable()
    if reason:
        pytest.skip(reason)


def test_rtsp_kill_and_restart_reconnects(rtsp_available):
    with RtspServer(size=(320, 240), fps=15) as server:
        source = open_source(SourceSettings(url=server.url), "door", FAST)
        seen: list[StatusChange] = []
        with source:
            opened = wait_for_status(source, "connected", 10.0, seen)
            frame = source.read(5.0)
            assert frame is not None and frame.image.shape == (240, 320, 3) and frame.stream == "door"

            server.kill()
            killed = time.monotonic()
            lost = wait_for_status(source, "lost", 5.0, seen)
            assert lost - killed < 2.5  # a killed server is a clean end of stream, seen at once

            server.start()  # same port
            restarted = time.monotonic()
            wait_for_status(source, "reconnected", 10.0, seen)
            before = source.stats.frames
            fresh = source.read(5.0)
            assert fresh is not None and fresh.index >= before
            flowing = time.monotonic()
            assert flowing - opened < 20.0
            stats = source.stats
        assert [c.status for c in seen] == ["connected", "lost", "reconnected"]
        assert stats.reconnects == 1
        print(f"rtsp: lost {lost - killed:.2f} s after kill, frames again {flowing - restarted:.2f} s after restart")


def test_rtsp_frozen_server_is_caught_by_the_watchdog(rtsp_available):
    with RtspServer(size=(320, 240), fps=15) as server:
        source = open_source(SourceSettings(url=server.url), "door", FAST)
        seen: list[StatusChange] = []
        with source:
            wait_for_status(source, "connected", 10.0, seen)
            assert source.read(5.0) is not None
            server.freeze()  # SIGSTOP: the connection stays open, nothing arrives
            frozen = time.monotonic()
            lost = wait_for_status(source, "lost", 6.0, seen)
            assert FAST.frame_timeout_s - 0.5 <= lost - frozen <= FAST.frame_timeout_s + 1.5
            assert "no frame" in seen[-1].detail
            server.thaw()
            wait_for_status(source, "reconnected", 12.0, seen)
            assert source.read(5.0) is not None
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 2.0
        assert [c.status for c in seen] == ["connected", "lost", "reconnected"]


@pytest.mark.parametrize("name", ["hamilton", "astronaut"])
def test_rtsp_serves_a_file(rtsp_available, clip, name):
    """The astronaut sample is High profile with one key frame per many frames: a client that throws away
    what it read while probing (fflags nobuffer) never decodes a frame of it."""
    path = clip if name == "hamilton" else Path(__file__).resolve().parents[1] / "sample_videos" / "astronaut.mp4"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with av.open(str(path)) as container:
        size = (container.streams.video[0].height, container.streams.video[0].width)
    with RtspServer(file=path) as server:
        with open_source(SourceSettings(url=server.url), "file-over-rtsp", FAST) as source:
            frames = []
            while len(frames) < 10 and (frame := source.read(5.0)) is not None:
                frames.append(frame)
    assert len(frames) == 10 and all(f.image.shape == (*size, 3) for f in frames)
