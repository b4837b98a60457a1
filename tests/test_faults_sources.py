"""Source faults a real site produces: a live looped file whose watchdog fired (the process was stopped for
longer than frame_timeout_s), retries that keep failing, and a file with corrupt packets in the middle."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from streamer.config import ReconnectSettings
from streamer.sources import PyAVSource, Source, StatusChange

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_videos" / "astronaut.mp4"  # 240 frames, 30 fps, h264


def statuses(source: Source, seen: list[StatusChange], want: str, within: float) -> bool:
    """Read frames until `want` is reported (True) or `within` seconds pass (False)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for change in source.poll_status():
            seen.append(change)
            if change.status == want:
                return True
        source.read(0.05)
    return False


# ----------------------------------------------------------------------------- a stopped process

# Runs a live looped file source and reports on stdout, one JSON object a line, every status change and
# every frame's (index, pts). The test stops and continues this process as an operator's machine would.
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from streamer.config import ReconnectSettings
    from streamer.sources import PyAVSource

    path, timeout_s = sys.argv[1], float(sys.argv[2])
    settings = ReconnectSettings(initial_delay_s=0.1, max_delay_s=0.5, frame_timeout_s=timeout_s, open_timeout_s=2.0)
    source = PyAVSource("cam", path, kind="file", target=path, live=True, loop=True, reconnect=settings)
    source.start()
    try:
        while True:
            frame = source.read(0.1)
            for change in source.poll_status():
                print(json.dumps({"status": change.status, "detail": change.detail}), flush=True)
            if frame is not None:
                print(json.dumps({"frame": frame.index, "pts": frame.pts}), flush=True)
    finally:
        source.stop()
    """
)


class Child:
    """The source process and its report lines, read on a thread so a stopped child never blocks the test."""

    def __init__(self, path: Path, frame_timeout_s: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(frame_timeout_s)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(json.loads(line))

    def until(self, predicate, within: float) -> list[dict]:
        """Lines up to and including the first one `predicate` accepts; fails after `within` seconds."""
        got: list[dict] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            got.append(line)
            if predicate(line):
                return got
        pytest.fail(f"nothing matched within {within} s; got {got[-5:]}; stderr: {''.join(self.stderr)[-2000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)


def test_live_looped_file_reconnects_after_the_process_was_stopped():
    timeout_s = 0.5
    child = Child(SAMPLE, timeout_s)
    try:
        child.until(lambda line: line.get("status") == "connected", 30)
        before = child.until(lambda line: line.get("frame", -1) >= 10, 10)
        # Stop the whole process for longer than frame_timeout_s. On SIGCONT the watchdog and the reader
        # race; when the reader wins (a fresh frame) the watchdog has nothing to say: stop it again.
        for _ in range(5):
            os.kill(child.process.pid, signal.SIGSTOP)
            time.sleep(3 * timeout_s)
            os.kill(child.process.pid, signal.SIGCONT)
            try:
                lost = child.until(lambda line: line.get("status") == "lost", 2.0)
                break
            except pytest.fail.Exception:
                continue
        else:
            pytest.fail("the watchdog never fired")
        last_pts = max(line["pts"] for line in before + lost if "pts" in line)
        stalled_at = time.monotonic()
        # Before the fix every reopen failed ("holds no decodable video frame") and it never came back.
        child.until(lambda line: line.get("status") == "reconnected", 5)
        recovered_s = time.monotonic() - stalled_at
        after = child.until(lambda line: "frame" in line, 5)
        after += [child.lines.get(timeout=5) for _ in range(20)]
        pts = [line["pts"] for line in after if "pts" in line]
        assert len(pts) >= 15
        assert pts[0] > last_pts and np.all(np.diff(pts) > 0), "pts must go on increasing after a reconnect"
        assert "no decodable video frame" not in "".join(child.stderr)
        print(f"live looped file: reconnected {recovered_s:.2f} s after the watchdog fired")
    finally:
        child.close()


# ----------------------------------------------------------------------------- retries that keep failing


@pytest.fixture
def short_clip(tmp_path) -> Path:
    """A 10-frame clip: a live (not looped) file reaches its end, is "lost" and reopened, again and again."""
    path = tmp_path / "short.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            image = np.full((48, 64, 3), i * 20, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_retry_failures_are_warnings_an_operator_sees_rate_limited(short_clip, caplog):
    settings = ReconnectSettings(initial_delay_s=0.05, max_delay_s=0.1, frame_timeout_s=2.0, open_timeout_s=2.0)
    source = PyAVSource("cam", str(short_clip), kind="file", target=str(short_clip), live=True, reconnect=settings)
    away = short_clip.with_name("moved.mp4")
    seen: list[StatusChange] = []
    caplog.set_level(logging.DEBUG, logger="streamer.sources")
    with source:
        assert statuses(source, seen, "connected", 5)
        short_clip.rename(away)  # the open file plays to its end; every reopen then fails
        assert statuses(source, seen, "lost", 5)
        time.sleep(1.5)  # ~15 retries at 0.05-0.1 s
        retries = [r for r in caplog.records if "still lost" in r.getMessage()]
        warnings = [r for r in retries if r.levelno == logging.WARNING]
        assert len(retries) >= 5
        assert len(warnings) == 1, "retry failures: one warning an operator sees, the rest held back"
        assert "does not exist" in warnings[0].getMessage()
        away.rename(short_clip)
        assert statuses(source, seen, "reconnected", 5)
    assert [c.status for c in seen][:3] == ["connected", "lost", "reconnected"]


# ----------------------------------------------------------------------------- corrupt packets


def corrupt_copy(source: Path, target: Path, spots: int = 5, size: int = 2000) -> Path:
    """`source` with `spots` runs of garbage written into the middle of its mdat box (the coded frames)."""
    data = bytearray(source.read_bytes())
    offset = 0
    while offset < len(data):
        box_size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if box_size == 1:
            box_size = struct.unpack(">Q", data[offset + 8:offset + 16])[0]
        if kind == b"mdat":
            break
        offset += box_size
    else:
        raise AssertionError(f"{source} has no mdat box")
    rng = np.random.default_rng(1)
    middle = offset + box_size // 2
    for k in range(spots):
        start = middle + k * box_size // 20
        data[start:start + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    return target


def read_file(path: Path) -> tuple[PyAVSource, list, list[StatusChange]]:
    source = PyAVSource("cam", str(path), kind="file", target=str(path), live=False)
    frames = []
    with source:
        while (frame := source.read(5.0)) is not None:
            frames.append(frame)
        changes = source.poll_status()
    return source, frames, changes


def test_corrupt_packets_are_skipped_counted_and_reported_at_the_end(tmp_path, caplog):
    clean, clean_frames, _ = read_file(SAMPLE)
    assert clean.corrupt_packets == 0 and clean.end_note is None
    damaged = corrupt_copy(SAMPLE, tmp_path / "damaged.mp4")
    caplog.set_level(logging.WARNING, logger="streamer.sources")
    source, frames, changes = read_file(damaged)
    # Decoding went on past the garbage: frames from after it, up to the end, were delivered.
    assert source.corrupt_packets > 0 and source.stats.corrupt_packets == source.corrupt_packets
    assert len(clean_frames) - 2 * source.corrupt_packets <= len(frames) < len(clean_frames)
    assert frames[-1].pts == pytest.approx(clean_frames[-1].pts)
    # A count at the end: in end_note (the pipeline's final stream.status detail) and in the "ended" status.
    note = f"{source.corrupt_packets} corrupt packets skipped"
    assert source.end_note == note
    assert [c.status for c in changes] == ["connected", "ended"] and note in changes[-1].detail
    # Said once, at the end, not per packet.
    assert [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()] == [
        f"source cam: {damaged}: {note}"
    ]


def faststart_copy(source: Path, target: Path) -> Path:
    """`source` remuxed with its index (moov) first, so a cut copy still opens."""
    with av.open(str(source)) as inp, av.open(str(target), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:  # the demuxer's empty flush packet
                packet.stream = stream
                out.mux(packet)
    return target


def test_truncated_and_corrupt_file_says_both(tmp_path):
    damaged = corrupt_copy(faststart_copy(SAMPLE, tmp_path / "fast.mp4"), tmp_path / "damaged.mp4")
    data = damaged.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.85)])
    source, frames, changes = read_file(cut)
    assert frames and source.corrupt_packets > 0
    assert source.end_note is not None and source.end_note.startswith("file truncated at ")
    assert source.end_note.endswith(f"; {source.corrupt_packets} corrupt packets skipped")
    assert changes[-1].detail == f"end of file: {source.end_note}"
