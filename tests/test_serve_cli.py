"""`streamer serve` as users start it: a subprocess on the Hamilton clip, a free loopback port, the admin
token printed once on the first start only, streams added and removed over the API, the live view, and
SIGTERM -> exit 0 within seconds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import httpx
import pytest

CLIP = "face_recognition/examples/short_hamilton_clip.mp4"
STOP_WITHIN_S = 15.0  # measured 4-9 s on 2 shared cores (the pipeline drains, as `streamer run`)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """A `streamer serve` subprocess and its stderr, read in a thread."""

    def __init__(self, args, env, bind="127.0.0.1:0"):
        self.process = subprocess.Popen([sys.executable, "-m", "streamer", "serve", *args, "--bind", bind],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def url(self, timeout=120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if "console and API on " in line:
                    return line.split("console and API on ", 1)[1].split("/ ", 1)[0]
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("serve did not start: " + "\n".join(self.lines))

    def stop(self) -> tuple[int, float]:
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self._reader.join(5)
        return code, time.monotonic() - started

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def env(model_dir, media_dir, cache_dir):
    env = dict(os.environ, STREAMER_MODEL_DIR=str(model_dir), STREAMER_MODELS__CACHE_DIR=str(cache_dir),
               STREAMER_PUBLISH__ENDPOINT=f"tcp://127.0.0.1:{_free_port()}", PYTHONUNBUFFERED="1")
    env.pop("STREAMER_SERVE__AUTH", None)
    return env


def _wait_for(fn, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _mjpeg_frames(client, path, count, timeout=60.0) -> list[bytes]:
    frames: list[bytes] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    with client.stream("GET", path, timeout=timeout) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("multipart/x-mixed-replace")
        for chunk in answer.iter_bytes():
            buffer += chunk
            while (start := buffer.find(b"\xff\xd8")) >= 0 and (end := buffer.find(b"\xff\xd9", start)) >= 0:
                frames.append(buffer[start:end + 2])
                buffer = buffer[end + 2:]
            if len(frames) >= count or time.monotonic() > deadline:
                break
    return frames


def test_serve_prints_the_admin_token_once_and_stops_on_sigterm(env, media_dir, lin_gallery, tmp_path):
    gallery = tmp_path / "people.db"
    shutil.copy(lin_gallery, gallery)
    clip = str(media_dir / CLIP)
    first = Served([clip, "--gallery", str(gallery)], env)
    try:
        url = first.url()
        printed = [line for line in first.lines if line.startswith("stk_")]
        assert len(printed) == 1 and any("admin token" in line for line in first.lines)
        token = printed[0]
        assert token not in (tmp_path / "people.db.tokens.json").read_text()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            assert client.get("/api/v1/me").json() == {"token": "admin"}
            streams = client.get("/api/v1/streams").json()["streams"]
            assert [s["id"] for s in streams] == ["cam0"]
            assert set(streams[0]) >= {"id", "url", "status", "fps", "frames", "dropped", "reconnects", "live"}
            # Events reach the ring through the supervisor's tap: the clip's lead is named.
            named = _wait_for(lambda: client.get("/api/v1/events", params={
                "kind": "identity", "name": "Lin-Manuel Miranda"}).json()["events"], 90, "an identity event")
            assert named[0]["stream"] == "cam0" and named[0]["seq"] >= 1
            # Unknown tracks (the clip has more people than the gallery) with their face, from the tap's crops.
            unknowns = _wait_for(lambda: client.get("/api/v1/unknowns").json()["unknowns"], 30, "an unknown")
            thumb = client.get(f"/api/v1/unknowns/{unknowns[0]['id']}/thumbnail.jpg")
            assert thumb.headers["content-type"] == "image/jpeg" and thumb.content.startswith(b"\xff\xd8")
            answers = [client.post(f"/api/v1/unknowns/{u['id']}/enrol", json={"name": "Stranger"}) for u in unknowns]
            assert 201 in [a.status_code for a in answers]  # some are too dark to enrol: one sentence says so
            assert all(a.status_code == 422 and "no usable face" in a.json()["error"] for a in answers if a.status_code != 201)
            assert "Stranger" in [p["name"] for p in client.get("/api/v1/people").json()["people"]]
            # The supervisor's stranger ids (u-N) over the API: listed, and promoted to that existing person.
            strangers = _wait_for(lambda: client.get("/api/v1/strangers").json()["strangers"], 30, "a stranger")
            assert {s["id"] for s in strangers} >= {u["stranger"] for u in unknowns if u["stranger"]}
            assert all(s["id"].startswith("u-") and s["faces"] >= 1 and s["streams"] == ["cam0"] for s in strangers)
            promoted = client.post(f"/api/v1/strangers/{strangers[0]['id']}/promote", json={"name": "Stranger"})
            assert (promoted.status_code, promoted.json()["name"]) == (201, "Stranger") and promoted.json()["added"] >= 1
            assert strangers[0]["id"] not in {s["id"] for s in client.get("/api/v1/strangers").json()["strangers"]}
            # A source added at run time, watched live, then removed.
            added = client.post("/api/v1/streams", json={"url": clip, "id": "replay", "loop": True})
            assert (added.status_code, added.json()) == (201, {"id": "replay"})
            assert client.post("/api/v1/streams", json={"url": clip, "id": "replay"}).status_code == 400
            frames = _mjpeg_frames(client, "/api/v1/streams/replay/live.mjpeg", 3)
            assert len(frames) >= 3 and len(set(frames)) >= 2  # the picture changes
            snapshot = client.get("/api/v1/streams/replay/snapshot.jpg")
            assert snapshot.status_code == 200 and snapshot.content.startswith(b"\xff\xd8")
            assert client.delete("/api/v1/streams/replay").status_code == 204
            assert "replay" not in [s["id"] for s in client.get("/api/v1/streams").json()["streams"]]
            assert client.delete("/api/v1/streams/replay").status_code == 404
        code, took = first.stop()
        assert code == 0 and took < STOP_WITHIN_S, (code, took, first.lines[-5:])
        assert not any("Traceback" in line for line in first.lines), "\n".join(first.lines)
    finally:
        first.kill()

    # Second start, no source, over HTTPS: it idles (sources can be added), prints no token, and the first one works.
    cert, key = _self_signed(tmp_path)
    second = Served(["--gallery", str(gallery)], {**env, "STREAMER_SERVE__TLS_CERT_FILE": str(cert),
                                                  "STREAMER_SERVE__TLS_KEY_FILE": str(key)})
    try:
        url = second.url()
        assert url.startswith("https://127.0.0.1:"), url
        assert not any(line.startswith("stk_") or "admin token" in line for line in second.lines)
        assert not any("in clear" in line for line in second.lines)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                          verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert client.get("/api/v1/streams").json() == {"streams": []}
            time.sleep(2)
            assert second.process.poll() is None and client.get("/api/v1/me").status_code == 200
        code, took = second.stop()
        assert code == 0 and took < STOP_WITHIN_S, (code, took, second.lines[-5:])
    finally:
        second.kill()


def test_serve_refuses_a_port_in_use_in_one_line(env, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "streamer", "serve", "--bind", f"127.0.0.1:{port}",
                               "--gallery", str(tmp_path / "g.db")], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "serve.bind" in done.stderr, done.stderr
    assert not (tmp_path / "g.db").exists() and not (tmp_path / "g.db.tokens.json").exists()


def _self_signed(folder):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing (apt-get install openssl)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_plain_http_beyond_loopback_needs_allow_plain_http_and_warns(env, tmp_path):
    refused = subprocess.run([sys.executable, "-m", "streamer", "serve", "--bind", "0.0.0.0:0", "--gallery",
                              str(tmp_path / "g.db")], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "beyond loopback without TLS" in refused.stderr and "serve.allow_plain_http" in refused.stderr
    served = Served(["--gallery", str(tmp_path / "g.db")], {**env, "STREAMER_SERVE__ALLOW_PLAIN_HTTP": "true"},
                    bind="0.0.0.0:0")
    try:
        served.url()
        warnings = [line for line in served.lines if "cross the network in clear" in line]
        assert len(warnings) == 1, served.lines
        code, _ = served.stop()
        assert code == 0
    finally:
        served.kill()
