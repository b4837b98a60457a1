"""Recognition is never lost silently: inference that is unreachable, or goes away and comes back.

First the inference client's health against real sockets the test opens and closes (fast), then end to
end: `streamer run` in a child process, a real `streamer inference-worker` on a tcp loopback endpoint that
the test kills (SIGKILL) and starts again on the same endpoint, a real subscriber.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from streamer.pipeline.protocol import Hello
from test_inference_client import FakeWorker, chip_batch, make_client
from test_pipeline import SAMPLE, SAMPLE_STILL, Run, check_stream_invariants, free_endpoint


# -- the client alone --------------------------------------------------------------------------------------
@pytest.fixture()
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def poll_until(client, status: str, timeout_s: float = 5.0) -> list:
    """Every health change until one is `status` (or fail)."""
    deadline = time.monotonic() + timeout_s
    changes: list = []
    while time.monotonic() < deadline:
        client.receive(timeout_ms=20)
        changes += client.poll_health()
        if changes and changes[-1].status == status:
            return changes
    raise AssertionError(f"inference never became {status}: {changes}, {client.health} {client.health_detail!r}")


def test_an_endpoint_nobody_listens_on_is_down_with_why_and_faces_are_not_queued(context):
    endpoint = free_endpoint()
    client = make_client(context, endpoint, connect_grace_s=0.3, timeout_s=5.0)
    try:
        assert client.health == "starting" and client.poll_health() == []
        (change,) = poll_until(client, "down")
        assert change.detail == f"cannot connect to {endpoint} (nothing listens there, or it is unreachable)"
        assert client.health == "down" and client.health_detail == change.detail and not client.ever_up
        started = time.monotonic()
        assert not client.submit(chip_batch(3, 1), live=False)  # a file does not wait for a worker that is down
        assert time.monotonic() - started < 0.05
        assert client.dropped == 1 and client.faces_dropped == 3 and client.pending == 0
        assert client.poll_health() == []  # said once
    finally:
        client.close()


def test_a_worker_that_goes_away_is_down_and_is_used_again_when_it_is_back(context):
    worker = FakeWorker(context)
    endpoint = worker.endpoint
    client = make_client(context, endpoint, connect_grace_s=0.3)
    try:
        assert isinstance(worker.next(), Hello)
        worker.welcome()
        assert [c.status for c in poll_until(client, "up")] == ["up"] and client.ever_up
        assert client.submit(chip_batch(2, 1), live=True) and client.pending == 1
        worker.close()  # gone, with a request in flight
        (down,) = poll_until(client, "down")
        assert down.detail == f"lost the connection to {endpoint}"
        assert client.pending == 0 and client.expired == 1  # its tracks are picked again later
        assert not client.submit(chip_batch(1, 2), live=True) and client.dropped == 1

        worker = FakeWorker(context, endpoint)  # back on the same endpoint
        deadline = time.monotonic() + 5
        while not worker.socket.poll(20):  # the client asks at once on the new connection
            assert client.poll_health() == [] and time.monotonic() < deadline
        assert isinstance(worker.next(), Hello)
        worker.welcome()
        (up,) = poll_until(client, "up")
        assert up.detail.startswith("back after ") and client.health == "up" and client.health_detail == ""
        assert client.submit(chip_batch(1, 3), live=True)
        assert worker.requests(1)[0].n == 1
    finally:
        client.close()
        worker.close()


def test_a_worker_that_accepts_but_never_answers_is_down_after_the_timeout(context):
    silent = FakeWorker(context)
    client = make_client(context, silent.endpoint, connect_grace_s=0.2, timeout_s=0.6)
    try:
        assert client.submit(chip_batch(1, 1), live=True)
        started = time.monotonic()
        (down,) = poll_until(client, "down")
        assert time.monotonic() - started >= 0.4  # connected: the grace for connecting does not apply
        assert down.detail.startswith(f"{silent.endpoint} accepted the connection but has not answered"), down
        assert client.expired == 1 and client.pending == 0
    finally:
        client.close()
        silent.close()


def test_the_run_summary_says_how_long_inference_was_down():
    from streamer.pipeline.report import RunReport
    from streamer.publish.events import PipelineStatus, TrackStarted

    now = [1000.0]
    report = RunReport(clock=lambda: now[0])
    report.observe(TrackStarted(stream="cam", frame=0, pts=0.0, track=1, box=(0, 0, 10, 10)))
    assert not [line for line in report.lines(10, 1.0) if "inference" in line]  # never down: not a word
    for status, ts in (("down", 1000.0), ("up", 1002.5), ("down", 1010.0)):
        report.observe(PipelineStatus(inference=status, detail="x", ts=ts))
    now[0] = 1011.0  # still down at the end: that outage counts up to now
    assert report.lines(10, 1.0)[1] == ("inference was down 2 times, 3.5 s in all: faces seen meanwhile were not "
                                        "recognised")


# -- end to end --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(model_dir, cache_dir):
    return {**os.environ, "STREAMER_MODEL_DIR": str(model_dir), "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, model_dir, cache_dir) -> Path:
    from streamer.config import load_settings
    from streamer.engine import FaceEngine
    from streamer.match.gallery import Gallery

    path = tmp_path_factory.mktemp("gallery") / "people.db"
    settings = load_settings(overrides={"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}})
    with FaceEngine(settings) as engine, Gallery(path) as people:
        engine.enroll(people, "Eileen Collins", [SAMPLE_STILL])
    return path


class RemoteWorker:
    """`streamer inference-worker` on `endpoint`; `start` returns once it listens. `keys`: its CURVE keys
    folder; `prefix`: a command prefix to run it with (`ip netns exec NS` for another host)."""

    def __init__(self, endpoint: str, env: dict[str, str], *, keys: Path | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        self.endpoint, self.env, self.keys, self.prefix = endpoint, env, keys, tuple(prefix)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> float:
        """Start it; the time.monotonic() at which it said it listens."""
        keys = ["--keys", str(self.keys)] if self.keys is not None else []
        self.process = subprocess.Popen([*self.prefix, sys.executable, "-m", "streamer", "inference-worker", "--bind",
                                         self.endpoint, *keys], env=self.env, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        stream = self.process.stderr
        threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                assert self.process.poll() is None, f"the inference worker exited: {seen}"
                continue
            seen.append(line)
            if line.startswith("inference worker on "):
                return time.monotonic()
        raise AssertionError(f"the inference worker did not start: {seen}")

    def kill(self) -> float:
        """SIGKILL; the time.monotonic() at which it was sent."""
        assert self.process is not None
        sent_at = time.monotonic()
        self.process.kill()
        self.process.wait(10)
        return sent_at

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


def operator_lines(stderr: str, fragment: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("streamer: ") and fragment in line]


@pytest.mark.slow
def test_a_file_run_whose_recognition_never_worked_exits_1_with_one_line(env, gallery):
    endpoint = free_endpoint()  # nothing listens there
    run = Run([str(SAMPLE), "--gallery", str(gallery)],
              {**env, "STREAMER_INFERENCE__ENDPOINT": endpoint, "STREAMER_PUBLISH__HEARTBEAT_S": "0.5"})
    code = run.finish()
    assert code == 1, run.stderr  # it used to be 0: tracks, no identities, and not a word
    assert "Traceback" not in run.stderr, run.stderr
    check_stream_invariants(run)
    (error,) = operator_lines(run.stderr, "error: recognition never worked")
    assert f"cannot connect to {endpoint}" in error and "STREAMER_INFERENCE__ENDPOINT" in error, error
    (down,) = operator_lines(run.stderr, "inference is down")  # said once, with what to check
    assert endpoint in down and "inference-worker" in down, down
    statuses = [e for e in run.events if e.kind == "pipeline.status"]
    assert [e.inference for e in statuses] == ["down"] and f"cannot connect to {endpoint}" in statuses[0].detail
    assert statuses[0].stream == "*" and statuses[0].topic == b"pipeline.status.*"
    assert [e for e in run.events if e.kind == "track.started"], "tracking goes on without inference"
    assert not [e for e in run.events if e.kind in ("identity", "attributes")]
    heartbeat = [e for e in run.events if e.kind == "heartbeat"][-1]
    assert heartbeat.inference == "down" and endpoint in heartbeat.inference_detail


@pytest.mark.slow
def test_a_remote_worker_that_goes_away_and_comes_back_is_used_again(env, gallery, tmp_path):
    endpoint = free_endpoint()
    worker = RemoteWorker(endpoint, env)
    worker.start()
    config = tmp_path / "loop.yaml"
    config.write_text(f"sources:\n  - url: {SAMPLE}\n    id: loop\n    loop: true\n    live: true\n")
    run = Run(["--config", str(config), "--gallery", str(gallery)],
              {**env, "STREAMER_INFERENCE__ENDPOINT": endpoint, "STREAMER_PUBLISH__HEARTBEAT_S": "0.5",
               "STREAMER_RECOGNITION__REFRESH_S": "0.5"})
    try:
        run.wait_for(lambda e: e.kind == "identity" and e.name == "Eileen Collins", 120, "her name")
        run.wait_for(lambda e: e.kind == "heartbeat" and e.inference == "up", 10, "a heartbeat saying inference is up")
        assert not [e for e in run.events if e.kind == "pipeline.status"], "nothing to say while it works"

        killed_at = worker.kill()
        down = run.wait_for(lambda e: e.kind == "pipeline.status", 30, "inference down")
        down_after = time.monotonic() - killed_at
        assert down.inference == "down" and endpoint in down.detail, down
        run.wait_for(lambda e: e.kind == "heartbeat" and e.inference == "down", 10, "a heartbeat saying it is down")
        mark = len(run.events)
        run.pump(1.5)
        assert not [e for e in run.events[mark:] if e.kind in ("identity", "attributes")]

        listening_at = worker.start()  # the same endpoint, a new process: streamer is not restarted
        up = run.wait_for(lambda e: e.kind == "pipeline.status", 60, "inference back")
        back_after = time.monotonic() - listening_at
        assert up.inference == "up" and up.detail.startswith("back after"), up
        mark = len(run.events)
        run.wait_for(lambda e: e.kind == "attributes", 30, "recognition results after the comeback")
        run.wait_for(lambda e: e.kind == "identity" and e.name == "Eileen Collins", 60, "her name again")
        assert not [e for e in run.events[mark:] if e.kind == "heartbeat" and e.inference != "up"]
        assert run.stop(signal.SIGINT) == 0, run.stderr
    finally:
        worker.stop()
        if run.process.poll() is None:
            run.process.kill()
    print(f"inference down detected {down_after:.2f} s after the worker was killed; back "
          f"{back_after:.2f} s after the new worker listened")
    check_stream_invariants(run)
    assert [e.inference for e in run.events if e.kind == "pipeline.status"] == ["down", "up"]
    assert len(operator_lines(run.stderr, "inference is down")) == 1, run.stderr
    assert len(operator_lines(run.stderr, "inference is back")) == 1, run.stderr
    assert any("inference was down once" in line for line in operator_lines(run.stderr, "")), run.stderr
    assert down_after < 3.0 and back_after < 5.0, (down_after, back_after)
