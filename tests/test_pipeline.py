"""`streamer run` end to end: real clips, real worker processes, a real ZeroMQ subscriber, a real RTSP server."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from streamer.publish.subscriber import EventSubscriber

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_videos" / "astronaut.mp4"
SAMPLE_STILL = REPO / "sample_videos" / "astronaut.jpg"

pytestmark = pytest.mark.slow


def free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def env(model_dir, cache_dir):
    return {
        **os.environ,
        "STREAMER_MODEL_DIR": str(model_dir),
        "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
        "PYTHONPATH": str(REPO),
    }


class Run:
    """`streamer run` in a child process with a subscriber connected before it starts.

    `wait_for` only looks at messages that arrive during the call, so successive waits see new events."""

    def __init__(self, args: list[str], env: dict[str, str], verbose: bool = False) -> None:
        self.endpoint = free_endpoint()
        self.subscriber = EventSubscriber(self.endpoint, timeout_ms=200)
        self.messages: list = []
        command = [sys.executable, "-m", "streamer", "run", *args, "--publish", self.endpoint, "-q"]
        if verbose:
            command.append("-v")
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @property
    def events(self) -> list:
        return [m.event for m in self.messages]

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self.subscriber.receive_message(100)
            if message is not None:
                self.messages.append(message)

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.subscriber.receive_message(100)
            if message is None:
                if self.process.poll() is not None:
                    break
                continue
            self.messages.append(message)
            if predicate(message.event):
                return message.event
        raise AssertionError(f"timed out waiting for {what}; stderr:\n{self.stderr_now()}")

    def stderr_now(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.stderr.read()[-5000:]

    def finish(self, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.pump(0.2)
        if self.process.poll() is None:
            self.process.kill()
            raise AssertionError("streamer run did not finish in time")
        self.pump(0.5)  # the last events after exit
        self.stderr = self.process.stderr.read()
        self.subscriber.close()
        return self.process.returncode

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        self.process.send_signal(sig)
        return self.finish(timeout)


def check_stream_invariants(run: Run) -> None:
    """What every subscriber may rely on: seq from 1 without gaps, valid events, privacy by default."""
    seqs = [e.seq for e in run.events]
    assert seqs and seqs[0] == 1, seqs[:5]
    assert seqs == list(range(1, len(seqs) + 1)), "seq skipped or repeated"
    assert run.subscriber.invalid == 0
    for message in run.messages:
        payload = json.loads(message.payload)
        assert payload["schema"] == "streamer.event/1"
        assert message.topic.decode() == f"{payload['kind']}.{payload['stream']}"
        assert message.crop is None and "crop" not in payload and "embedding" not in payload
    started = Counter((e.stream, e.track) for e in run.events if e.kind == "track.started")
    ended = Counter((e.stream, e.track) for e in run.events if e.kind == "track.ended")
    assert started == ended, "every started track must end, once"
    assert max(started.values(), default=1) == 1


@pytest.fixture(scope="module")
def lin_gallery(tmp_path_factory, media_dir, model_dir, cache_dir):
    from streamer.config import load_settings
    from streamer.engine import FaceEngine
    from streamer.match.gallery import Gallery

    path = tmp_path_factory.mktemp("gallery") / "people.db"
    settings = load_settings(overrides={"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}})
    with FaceEngine(settings) as engine, Gallery(path) as gallery:
        engine.enroll(gallery, "Lin-Manuel Miranda", [media_dir / "face_recognition/examples/lin-manuel-miranda.png"])
        engine.enroll(gallery, "Eileen Collins", [SAMPLE_STILL])
    return path


def test_hamilton_clip_names_lin_manuel_miranda(env, media_dir, lin_gallery):
    clip = media_dir / "face_recognition/examples/short_hamilton_clip.mp4"
    run = Run([str(clip), "--gallery", str(lin_gallery)], env)
    assert run.finish() == 0, run.stderr
    check_stream_invariants(run)
    identities = [e for e in run.events if e.kind == "identity"]
    named = [e for e in identities if e.name == "Lin-Manuel Miranda"]
    assert named, f"no identity event named him: {[(e.track, e.name, e.score) for e in identities]}"
    assert all(0.5 < e.score <= 1 and e.distance < 0.6 for e in named)
    assert not [e for e in identities if e.name == "Eileen Collins"], "nobody in this clip is the astronaut"
    attributes = [e for e in run.events if e.kind == "attributes"]
    # Age always; gender and emotion abstain (null) while the track's smoothed confidence is low.
    assert attributes and all(e.age is not None for e in attributes)
    assert any(e.gender for e in attributes) and any(e.emotion for e in attributes)
    assert not [e for e in attributes if e.emotion and e.emotion.label == "angry"], "people laughing read angry"
    status = [e.status for e in run.events if e.kind == "stream.status"]
    assert status[0] == "connected" and status[-1] == "ended"
    assert run.events[-1].kind in ("heartbeat", "stream.status")
    heartbeat = [e for e in run.events if e.kind == "heartbeat"][-1]
    assert heartbeat.streams["cam0"].frames == 275
    # The run says what it did, on stderr, from what it published.
    tracks = sorted(e.track for e in run.events if e.kind == "track.started")
    lines = [line for line in run.stderr.splitlines() if line.startswith("streamer: ")]
    assert lines[0] == f"streamer: publishing events on {run.endpoint} (watch them with: streamer subscribe {run.endpoint})"
    assert "streamer: 275 frames in " in lines[1] and lines[1].endswith(f", {len(tracks)} tracks")
    his = sorted({e.track for e in named})
    assert any(line.startswith("streamer: recognised Lin-Manuel Miranda on track") and f"#{his[0]}" in line
               for line in lines), lines


def test_adaptive_detection_with_regions_names_lin_on_the_same_frame(env, media_dir, lin_gallery):
    """The Hamilton clip's first face sits at the threshold (distance 0.59-0.60 against 0.6): detection that
    adapts, with regions, must name him as early as detection on every frame does."""
    clip = media_dir / "face_recognition/examples/short_hamilton_clip.mp4"
    first = {}
    for mode, extra in (("every frame", {"STREAMER_DETECTOR__MAX_INTERVAL": "1"}), ("adaptive", {})):
        run = Run([str(clip), "--gallery", str(lin_gallery)], {**env, **extra})
        assert run.finish() == 0, run.stderr
        check_stream_invariants(run)
        named = [e for e in run.events if e.kind == "identity" and e.name == "Lin-Manuel Miranda"]
        assert named, mode
        first[mode] = named[0].frame
        heartbeat = [e for e in run.events if e.kind == "heartbeat"][-1]
        assert heartbeat.streams["cam0"].frames == 275
    assert first["adaptive"] <= first["every frame"], first


def test_pedestrian_clip_track_ids_stay_stable(env, media_dir):
    clip = media_dir / "facenet_pytorch/examples/video.mp4"
    run = Run([str(clip)], env)
    assert run.finish() == 0, run.stderr
    check_stream_invariants(run)
    ended = [e for e in run.events if e.kind == "track.ended"]
    # People walk toward the camera: a handful of tracks, several spanning most of the 105 frames.
    # An unstable tracker would fragment them into dozens of short tracks.
    assert 3 <= len(ended) <= 25, [(e.track, e.frames) for e in ended]
    long_tracks = [e for e in ended if e.frames >= 50]
    assert len(long_tracks) >= 3, [(e.track, e.frames) for e in ended]
    ids = [e.track for e in run.events if e.kind == "track.started"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # No gallery: every recognised face is unknown, by definition.
    assert all(e.name is None for e in run.events if e.kind == "identity")


def test_embeddings_and_crops_only_when_enabled(env, lin_gallery):
    run = Run(
        [str(SAMPLE), "--gallery", str(lin_gallery)],
        {**env, "STREAMER_PUBLISH__INCLUDE_EMBEDDINGS": "true", "STREAMER_PUBLISH__INCLUDE_CROPS": "1"},
    )
    assert run.finish() == 0, run.stderr
    identities = [m for m in run.messages if m.event.kind == "identity"]
    assert identities and all(m.event.name == "Eileen Collins" for m in identities)
    for message in identities:
        assert len(message.event.embedding) == 128
        assert message.crop is not None
        crop = cv2.imdecode(np.frombuffer(message.crop, np.uint8), cv2.IMREAD_COLOR)
        assert crop is not None and min(crop.shape[:2]) >= 20


def _face_sharpness(path: Path, frame_index: int, box) -> float:
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == frame_index:
                image = frame.to_ndarray(format="bgr24")
                break
    x1, y1, x2, y2 = (int(v) for v in box)
    gray = cv2.cvtColor(image[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def test_output_video_blurs_unknown_faces_only(env, lin_gallery, tmp_path):
    empty = tmp_path / "empty.db"
    from streamer.match.gallery import Gallery

    Gallery(empty).close()
    blurred, known = tmp_path / "blurred.mp4", tmp_path / "known.mp4"
    for gallery, output in ((empty, blurred), (lin_gallery, known)):
        run = Run([str(SAMPLE), "--gallery", str(gallery), "--output", str(output), "--blur-unknown"], env)
        assert run.finish() == 0, run.stderr
    started = next(e for e in run.events if e.kind == "track.updated" and e.frame > 60)
    with av.open(str(blurred)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (1280, 720)
        assert sum(1 for _ in container.decode(stream)) == 240
    inner = [started.box[0] + 8, started.box[1] + 8, started.box[2] - 8, started.box[3] - 8]
    sharp = _face_sharpness(known, started.frame, inner)
    soft = _face_sharpness(blurred, started.frame, inner)
    assert soft < 0.2 * sharp, (soft, sharp)


def test_sigterm_on_live_source_drains_and_exits_zero(env):
    run = Run(["lavfi:testsrc2=size=640x360:rate=30"], {**env, "STREAMER_PUBLISH__HEARTBEAT_S": "0.5"})
    beat = run.wait_for(lambda e: e.kind == "heartbeat" and e.streams["cam0"].frames > 10, 90, "a heartbeat")
    assert beat.streams["cam0"].status in ("connected", "reconnected") and beat.streams["cam0"].fps > 0
    assert run.stop(signal.SIGTERM) == 0, run.stderr
    check_stream_invariants(run)
    statuses = [e.status for e in run.events if e.kind == "stream.status"]
    assert statuses[0] == "connected" and statuses[-1] == "ended"


def _worker_pids(stderr_lines: list[str]) -> dict[str, int]:
    pids = {}
    for line in stderr_lines:
        found = re.search(r"started (\w+) worker \(pid (\d+)\)", line)
        if found:
            pids[found.group(1)] = int(found.group(2))
    return pids


def test_crashed_workers_are_reported_and_restarted(env, tmp_path):
    config = tmp_path / "loop.yaml"
    config.write_text(f"sources:\n  - url: {SAMPLE}\n    id: loop\n    loop: true\n    live: true\n")
    run = Run(["--config", str(config)], env, verbose=True)
    run.wait_for(lambda e: e.kind == "attributes", 120, "first attributes")
    # The supervisor logs each worker's pid at INFO (-v); read them without blocking on stderr.
    os.set_blocking(run.process.stderr.fileno(), False)
    lines: list[str] = []
    deadline = time.monotonic() + 10
    while len(_worker_pids(lines)) < 2 and time.monotonic() < deadline:
        chunk = run.process.stderr.read() or ""
        lines += chunk.splitlines()
        time.sleep(0.1)
    pids = _worker_pids(lines)
    assert set(pids) == {"detect", "inference"}, lines

    os.kill(pids["inference"], signal.SIGKILL)
    time.sleep(1.0)
    run.wait_for(lambda e: e.kind in ("attributes", "identity"), 120, "attributes after the inference worker was killed")

    run.wait_for(lambda e: e.kind == "track.started", 60, "a live track before the detect worker dies")
    live_before = {e.track for e in run.events if e.kind == "track.started"} - {
        e.track for e in run.events if e.kind == "track.ended"}
    assert live_before
    os.kill(pids["detect"], signal.SIGKILL)
    run.wait_for(lambda e: e.kind == "stream.status" and e.status == "lost" and "crashed" in e.detail, 30,
                 "the crash reported")
    crash_at = len(run.events)
    orphans = {e.track for e in run.events if e.kind == "track.ended" and e.reason == "worker_restart"}
    assert orphans == live_before, "every track live at the crash ends, with the reason"
    run.wait_for(lambda e: e.kind == "stream.status" and e.status == "connected", 60, "the restarted reader")
    run.wait_for(lambda e: e.kind == "track.started", 60, "tracks after the restart")
    os.set_blocking(run.process.stderr.fileno(), True)
    assert run.stop(signal.SIGINT) == 0
    seqs = [e.seq for e in run.events]
    assert seqs == list(range(1, len(seqs) + 1)), "a worker restart must not reset or skip seq"
    before = {e.track for e in run.events[:crash_at] if e.kind == "track.started"}
    after = {e.track for e in run.events[crash_at:] if e.kind == "track.started"}
    assert after and not before & after and min(after) > max(before), "track ids are never reused in a run"
    check_stream_invariants(run)


def test_rtsp_server_killed_and_restarted(env):
    from rtsp_server import RtspServer, rtsp_server_unavailable

    why = rtsp_server_unavailable()
    if why:
        pytest.skip(why)
    with RtspServer(file=SAMPLE) as server:
        run = Run([server.url], {**env, "STREAMER_PUBLISH__HEARTBEAT_S": "0.5"})
        run.wait_for(lambda e: e.kind == "stream.status" and e.status == "connected", 60, "connected")
        run.wait_for(lambda e: e.kind == "track.started", 60, "a track from the RTSP stream")
        server.kill()
        run.wait_for(lambda e: e.kind == "stream.status" and e.status == "lost", 30, "lost")
        server.start()
        run.wait_for(lambda e: e.kind == "stream.status" and e.status == "reconnected", 60, "reconnected")
        run.wait_for(lambda e: e.kind == "track.started", 60, "events after reconnect")
        assert run.stop() == 0, run.stderr
    check_stream_invariants(run)
    statuses = [e.status for e in run.events if e.kind == "stream.status"]
    assert statuses[0] == "connected" and "lost" in statuses and "reconnected" in statuses
    assert statuses[-1] == "ended"


def test_subscribe_command_and_schema(env):
    from streamer.publish.events import KINDS

    schema = json.loads(
        subprocess.run([sys.executable, "-m", "streamer", "events", "schema"], capture_output=True, text=True,
                       env=env, check=True).stdout
    )
    text = json.dumps(schema)
    for kind in KINDS:
        assert kind in text
    run = Run([str(SAMPLE)], env)
    printer = subprocess.Popen(
        [sys.executable, "-m", "streamer", "subscribe", run.endpoint, "--topic", "track.", "--timeout", "20"],
        env=env, stdout=subprocess.PIPE, text=True,
    )
    assert run.finish() == 0
    out, _ = printer.communicate(timeout=60)
    lines = [line for line in out.splitlines() if line]
    assert lines and all(line.startswith("track.") for line in lines)
    topic, payload = lines[0].split(" ", 1)
    assert json.loads(payload)["kind"] == topic.rsplit(".", 1)[0]


def test_bad_settings_fail_at_start_naming_the_setting(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracker:\n  min_hits: 0\n")
    result = subprocess.run([sys.executable, "-m", "streamer", "run", str(SAMPLE), "--config", str(bad)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "tracker.min_hits" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "streamer", "run", "/nonexistent/clip.mp4", "-q"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "/nonexistent/clip.mp4" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_model_is_one_line_before_any_worker_starts(env, tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "run", str(SAMPLE), "-q", "-v"],
        capture_output=True, text=True, timeout=120,
        env={**env, "STREAMER_MODEL_DIR": str(empty), "STREAMER_MODELS__CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "yunet" in result.stderr and "started" not in result.stderr  # no worker was spawned
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_inference_worker_that_cannot_start_is_one_line(env, tmp_path):
    bad = tmp_path / "not-onnx.onnx"
    bad.write_bytes(b"not a model")
    # The file exists (so the pre-flight resolve passes) but the inference worker cannot load it.
    paths = json.dumps({"emotion": str(bad)})
    result = subprocess.run([sys.executable, "-m", "streamer", "run", str(SAMPLE), "-q"], capture_output=True,
                            text=True, timeout=180, env={**env, "STREAMER_MODELS__PATHS": paths})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "restarting" not in result.stderr, result.stderr
    assert "emotion" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_remote_inference_worker_with_curve_keys(env, lin_gallery, tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "streamer", "keys", "generate", str(keys), "--client", "cam"],
                   check=True, env=env, capture_output=True, timeout=60)
    port = free_endpoint().rsplit(":", 1)[1]
    worker = subprocess.Popen([sys.executable, "-m", "streamer", "inference-worker", "--bind", f"tcp://*:{port}",
                               "--keys", str(keys)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        client = {**env, "STREAMER_INFERENCE__ENDPOINT": f"tcp://127.0.0.1:{port}",
                  "STREAMER_INFERENCE__SERVER_KEY": str(keys / "server.key"),
                  "STREAMER_INFERENCE__CLIENT_KEY": str(keys / "clients" / "cam.key_secret")}
        run = Run([str(SAMPLE), "--gallery", str(lin_gallery)], client)
        assert run.finish() == 0, run.stderr
        assert {e.name for e in run.events if e.kind == "identity"} == {"Eileen Collins"}
        # A host without a listed key gets nothing: its faces are never recognised.
        outsider = tmp_path / "outsider"
        subprocess.run([sys.executable, "-m", "streamer", "keys", "generate", str(outsider)], check=True, env=env,
                       capture_output=True, timeout=60)
        stranger = {**client, "STREAMER_INFERENCE__CLIENT_KEY": str(outsider / "clients" / "client.key_secret")}
        run = Run([str(SAMPLE), "--gallery", str(lin_gallery)], {**stranger, "STREAMER_PUBLISH__HEARTBEAT_S": "1"})
        run.finish()
        assert not [e for e in run.events if e.kind in ("identity", "attributes")]
        assert worker.poll() is None, "the worker keeps serving"
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


def test_remote_inference_worker_serves_a_run(env, lin_gallery):
    endpoint = free_endpoint()
    worker = subprocess.Popen([sys.executable, "-m", "streamer", "inference-worker", "--bind", endpoint],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        run = Run([str(SAMPLE), "--gallery", str(lin_gallery)], {**env, "STREAMER_INFERENCE__ENDPOINT": endpoint})
        assert run.finish() == 0, run.stderr
        names = {e.name for e in run.events if e.kind == "identity"}
        assert names == {"Eileen Collins"}
        assert any(e.kind == "attributes" for e in run.events)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


def test_several_streams_in_one_run(env, lin_gallery, media_dir, tmp_path):
    config = tmp_path / "two.yaml"
    config.write_text(
        "sources:\n"
        f"  - url: {SAMPLE}\n    id: lobby\n"
        f"  - url: {media_dir / 'face_recognition/examples/short_hamilton_clip.mp4'}\n    id: stage\n"
    )
    output = tmp_path / "out.mp4"
    run = Run(["--config", str(config), "--gallery", str(lin_gallery), "--output", str(output)], env)
    assert run.finish() == 0, run.stderr
    check_stream_invariants(run)
    names = {(e.stream, e.name) for e in run.events if e.kind == "identity" and e.name}
    assert ("lobby", "Eileen Collins") in names and ("stage", "Lin-Manuel Miranda") in names
    ended = {e.stream for e in run.events if e.kind == "stream.status" and e.status == "ended"}
    assert ended == {"lobby", "stage"}
    heartbeat = [e for e in run.events if e.kind == "heartbeat"][-1]
    assert {k: v.frames for k, v in heartbeat.streams.items()} == {"lobby": 240, "stage": 275}
    for stream, size in (("lobby", (1280, 720)), ("stage", (640, 360))):
        with av.open(str(tmp_path / f"out-{stream}.mp4")) as container:
            video = container.streams.video[0]
            assert (video.width, video.height) == size


def test_gallery_changes_apply_to_a_running_stream(env, tmp_path, model_dir, cache_dir):
    """Enroll while running: the person gets named. Remove them: new tracks are unknown again."""
    from streamer.config import load_settings
    from streamer.engine import FaceEngine
    from streamer.match.gallery import Gallery

    gallery_path = tmp_path / "live.db"
    Gallery(gallery_path).close()
    config = tmp_path / "loop.yaml"
    config.write_text(f"sources:\n  - url: {SAMPLE}\n    id: loop\n    loop: true\n    live: true\n")
    run = Run(["--config", str(config), "--gallery", str(gallery_path)], {**env, "STREAMER_RECOGNITION__REFRESH_S": "0.5"})
    run.wait_for(lambda e: e.kind == "identity" and e.name is None, 120, "an unknown face before enrolment")
    settings = load_settings(overrides={"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}})
    with FaceEngine(settings) as engine, Gallery(gallery_path, create=False) as gallery:
        engine.enroll(gallery, "Eileen Collins", [SAMPLE_STILL])
    run.wait_for(lambda e: e.kind == "identity" and e.name == "Eileen Collins", 60, "her name after enrolment")
    with Gallery(gallery_path, create=False) as gallery:
        gallery.remove("Eileen Collins")
    started_after_removal = set()

    def unknown_on_a_new_track(event) -> bool:
        if event.kind == "track.started":
            started_after_removal.add(event.track)
        return event.kind == "identity" and event.track in started_after_removal and event.name is None

    run.wait_for(unknown_on_a_new_track, 90, "an unknown identity on a track started after the removal")
    assert run.stop() == 0


def test_unreachable_camera_at_start(env):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"rtsp://127.0.0.1:{probe.getsockname()[1]}/stream"
    result = subprocess.run([sys.executable, "-m", "streamer", "run", url, "-q", "--publish", free_endpoint()],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to any source" in lines[0] and url in lines[0], result.stderr
    # A service that may start before its cameras keeps retrying instead, and says so.
    run = Run([url], {**env, "STREAMER_RECONNECT__EXIT_IF_NONE_CONNECT": "false"})
    lost = run.wait_for(lambda e: e.kind == "stream.status", 60, "the first status")
    assert lost.status == "lost" and "open failed" in lost.detail
    run.pump(2.0)
    assert run.process.poll() is None, "it must keep retrying"
    assert run.stop(signal.SIGTERM) == 0
    assert "retrying" in run.stderr
