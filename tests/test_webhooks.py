"""Webhook sink against a real local HTTP server (http.server in a thread) and in a real `streamer run`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from streamer.config import WebhookSettings, load_settings
from streamer.errors import ConfigError
from streamer.publish.events import Identity, StreamStatus, TrackStarted
from streamer.publish.webhooks import WebhookSink

REPO = Path(__file__).resolve().parents[1]
LIN = "Lin-Manuel Miranda"
BOX = (1.0, 2.0, 30.0, 40.0)


class HookServer:
    """Records every POST; answers `fail_status` to the first `fail_first` of them, or hangs `delay_s`."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500, delay_s: float = 0.0) -> None:
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay_s = delay_s
        self.calls = 0
        self.received: list[dict] = []  # the successful ones: path, headers, body
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with server.lock:
                    server.calls += 1
                    failing = server.calls <= server.fail_first
                if server.delay_s:
                    time.sleep(server.delay_s)
                status = server.fail_status if failing else 204
                if not failing:
                    with server.lock:
                        server.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", auth: str = "") -> str:
        return f"http://{auth}127.0.0.1:{self.port}{path}"

    def bodies(self) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.received]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers: list[HookServer] = []

    def make(**kwargs) -> HookServer:
        servers.append(HookServer(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def identity(seq: int, name: str | None, track: int = 1) -> Identity:
    return Identity(seq=seq, stream="cam0", frame=seq, pts=seq / 30, track=track, box=BOX, name=name, score=0.9,
                    distance=0.3, votes={name or "unknown": 2})


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_failures_are_retried_with_backoff_counted_and_order_kept(server):
    hook = server(fail_first=2)
    sink = WebhookSink(WebhookSettings(url=hook.url(), retries=3))
    try:
        events = [identity(seq, LIN) for seq in (1, 2, 3)]
        begin = time.monotonic()
        for event in events:
            sink.publish(event)
        # The server has the body before the sink has read the answer and counted it: wait for both.
        wait_until(lambda: len(hook.received) == 3 and sink.stats()["sent"] == 3, 10, "all three events")
        assert time.monotonic() - begin >= 0.5 + 1.0 * 0.9, "two failures: waits of 0.5 s and 1 s before the third try"
        assert [r["body"] for r in hook.received] == [e.payload() for e in events], "the ZeroMQ payload, in order"
        assert hook.received[0]["headers"]["content-type"] == "application/json"
        assert sink.stats() == {"sent": 3, "dropped": 0, "failed": 0, "queued": 0, "errors": 2}
    finally:
        sink.close()


def test_gives_up_after_the_retries_and_goes_on(server, caplog):
    hook = server(fail_first=4, fail_status=503)
    sink = WebhookSink(WebhookSettings(url=hook.url("/secret-path-token"), retries=1))
    try:
        sink.publish(identity(1, LIN))  # attempts 1, 2: both 503, given up
        sink.publish(identity(2, LIN))  # attempts 3, 4: given up too
        sink.publish(identity(3, LIN))  # attempt 5 succeeds
        # The server has the body before the sink has read the answer and counted it: wait for the count.
        wait_until(lambda: hook.bodies() and sink.stats()["sent"] == 1, 10, "the event after the failures")
        assert [b["seq"] for b in hook.bodies()] == [3]
        assert sink.stats()["failed"] == 2 and sink.stats()["errors"] == 4 and sink.stats()["sent"] == 1
        lines = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
        assert lines and "HTTP 503" in lines[0] and "secret-path-token" not in " ".join(lines)
    finally:
        sink.close()


def test_a_client_error_is_not_retried(server):
    hook = server(fail_first=1, fail_status=404)
    sink = WebhookSink(WebhookSettings(url=hook.url(), retries=5))
    try:
        sink.publish(identity(1, LIN))
        sink.publish(identity(2, LIN))
        wait_until(lambda: hook.bodies(), 5, "the second event")
        assert hook.calls == 2 and sink.stats()["failed"] == 1 and [b["seq"] for b in hook.bodies()] == [2]
    finally:
        sink.close()


def test_kinds_and_names_filters(server):
    hook = server()
    sink = WebhookSink(WebhookSettings(url=hook.url(), kinds=["identity", "stream.status"], names=[LIN]))
    try:
        sink.publish(StreamStatus(seq=1, stream="cam0", status="connected"))
        sink.publish(TrackStarted(seq=2, stream="cam0", frame=1, pts=0.0, track=1, box=BOX))
        sink.publish(identity(3, LIN))
        sink.publish(identity(4, "Ada Lovelace"))
        sink.publish(identity(5, None))
        sink.publish(StreamStatus(seq=6, stream="cam0", status="ended"))
        wait_until(lambda: len(hook.received) >= 3, 5, "the matching events")
        time.sleep(0.2)
        assert [(b["seq"], b["kind"]) for b in hook.bodies()] == [(1, "stream.status"), (3, "identity"),
                                                                  (6, "stream.status")]
    finally:
        sink.close()


def test_headers_and_basic_auth_from_the_url(server):
    hook = server()
    bearer = WebhookSink(WebhookSettings(url=hook.url("/a"), headers={"Authorization": "Bearer t0ken"}))
    basic = WebhookSink(WebhookSettings(url=hook.url("/b", auth="user:p%40ss@")))
    try:
        bearer.publish(identity(1, LIN))
        basic.publish(identity(2, LIN))
        wait_until(lambda: len(hook.received) == 2, 5, "both events")
        auth = {r["path"]: r["headers"].get("Authorization") for r in hook.received}
        assert auth["/a"] == "Bearer t0ken"
        import base64

        assert auth["/b"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
        assert "t0ken" not in repr(bearer.settings)
    finally:
        bearer.close()
        basic.close()


def test_a_hanging_server_never_blocks_the_caller_and_the_queue_is_bounded(server):
    hook = server(delay_s=5.0)
    sink = WebhookSink(WebhookSettings(url=hook.url(), queue=20, timeout_s=0.5, retries=0))
    try:
        begin = time.perf_counter()
        for seq in range(1, 2001):
            sink.publish(identity(seq, LIN))
        elapsed = time.perf_counter() - begin
        assert elapsed < 0.5, f"2000 publishes took {elapsed:.3f} s against a hanging server"
        stats = sink.stats()
        assert stats["queued"] <= 20 and stats["dropped"] >= 2000 - 21
    finally:
        begin = time.monotonic()
        sink.close(1.0)
        assert time.monotonic() - begin < 1.5, "close() waited for the hanging server"


def test_an_unreachable_hook_is_retried_then_counted():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connections are refused
    sink = WebhookSink(WebhookSettings(url=f"http://127.0.0.1:{port}/x", retries=1))
    try:
        sink.publish(identity(1, LIN))
        wait_until(lambda: sink.stats()["failed"] == 1, 5, "the event to be given up")
        assert sink.stats()["errors"] == 2
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("hook", "error"),
    [
        ({"url": "ftp://127.0.0.1/x"}, "expected http://HOST"),
        ({"url": "http://127.0.0.1/x", "kinds": ["identities"]}, "unknown event kind 'identities'"),
        ({"url": "http://127.0.0.1/x", "headers": {"Bad Header": "x"}}, "not a valid HTTP header name"),
        ({"url": "http://127.0.0.1/x", "kinds": []}, "at least 1 item"),
    ],
)
def test_bad_webhook_settings_fail_naming_the_setting(hook, error):
    with pytest.raises(ConfigError, match=error) as raised:
        load_settings(overrides={"publish": {"webhooks": [hook]}})
    assert "publish.webhooks.0" in str(raised.value)



def test_streamer_run_posts_his_identity_through_failures(server, tmp_path, media_dir, model_dir, cache_dir,
                                                          lin_gallery):
    hook = server(fail_first=2)
    unfiltered = server()
    config = tmp_path / "run.yaml"
    config.write_text(
        f"sources:\n  - url: {media_dir / 'face_recognition/examples/short_hamilton_clip.mp4'}\n"
        "publish:\n  webhooks:\n"
        f"    - url: {hook.url()}\n      kinds: [identity, stream.status]\n      names: ['{LIN}']\n"
        f"    - url: {unfiltered.url()}\n      kinds: [track.ended]\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "STREAMER_MODEL_DIR": str(model_dir), "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
           "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(config), "--gallery", str(lin_gallery),
         "--publish", endpoint, "-q"], env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    bodies = hook.bodies()
    kinds = [b["kind"] for b in bodies]
    assert kinds[0] == "stream.status" and kinds[-1] == "stream.status", kinds  # connected ... ended
    names = {b["name"] for b in bodies if b["kind"] == "identity"}
    assert names == {LIN}, "only identities naming him pass the names filter"
    assert hook.calls == len(bodies) + 2, "the two failed calls were retried, not lost"
    ended = unfiltered.bodies()
    assert ended and all(b["kind"] == "track.ended" for b in ended)
    assert len({b["track"] for b in ended}) == len(ended) >= 5
    seqs = [b["seq"] for b in bodies + ended]
    assert len(set(seqs)) == len(seqs)
