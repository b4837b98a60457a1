"""Network namespaces for multi-host tests on one machine.

    with Hosts(["core", "cam1", "cam2"], links=[("core", "cam1"), ("core", "cam2")]) as hosts:
        hosts.addr("cam1")          -> "10.R.1.2"   (cam1's end of core<->cam1)
        hosts.peer_addr("cam1", "core") -> "10.R.1.1"
        hosts.run("cam1", [sys.executable, "-c", "..."])  # CompletedProcess, text, 60 s timeout
        hosts.popen("core", [...]) -> subprocess.Popen in its own process group
        call_in(hosts.ns["core"], fn, *args)   # fn runs on a thread inside core's namespace: its sockets are core's

Names carry a per-run random tag so that namespaces left by a crashed earlier run cannot collide; teardown
kills what was started here and deletes the namespaces (which removes their veth pairs) even on failure.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (probed by making and deleting one)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (run the suite as root, as CI does)"
    probe = f"stp{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def enter(ns: str) -> None:
    """Move the calling thread (only it: Linux keeps the network namespace per thread) into `ns`.
    os.setns is Python 3.12+, hence libc."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {ns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def start_in(ns: str, target: Callable[..., Any], *args: Any) -> threading.Thread:
    """A daemon thread that enters `ns`, then runs target(*args); every socket it opens belongs to `ns`."""

    def body() -> None:
        enter(ns)
        target(*args)

    thread = threading.Thread(target=body, daemon=True, name=f"netns-{ns}")
    thread.start()
    return thread


def call_in(ns: str, fn: Callable[..., Any], *args: Any, timeout: float = 60) -> Any:
    """fn(*args) run inside `ns`: its result, or its exception raised here."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    start_in(ns, body).join(timeout)
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {ns} took over {timeout} s")
    return outcome["value"]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    def __init__(self, names: Sequence[str], links: Sequence[tuple[str, str]]):
        self.tag = secrets.token_hex(3)
        # The second octet is random per run too, so addresses of a leftover run never overlap.
        self.octet = 16 + secrets.randbelow(200)
        self.ns = {name: f"st{self.tag}{name}" for name in names}
        self.links = list(links)
        self._addr: dict[tuple[str, str], str] = {}
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Hosts:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for n, (a, b) in enumerate(self.links, start=1):
            # Interface names are limited to 15 characters, hence the short per-run form.
            ia, ib = f"v{self.tag}{n}a", f"v{self.tag}{n}b"
            _ip("link", "add", ia, "netns", self.ns[a], "type", "veth", "peer", "name", ib, "netns", self.ns[b])
            for host, iface, last in ((a, ia, 1), (b, ib, 2)):
                address = f"10.{self.octet}.{n}.{last}"
                _ip("-n", self.ns[host], "addr", "add", f"{address}/24", "dev", iface)
                _ip("-n", self.ns[host], "link", "set", iface, "up")
                self._addr[(host, b if host == a else a)] = address

    def peer_addr(self, host: str, peer: str) -> str:
        """The address of `peer` on the link between `host` and `peer`."""
        return self._addr[(peer, host)]

    def addr(self, host: str, peer: str | None = None) -> str:
        """`host`'s address on its link to `peer` (or on its only link)."""
        mine = [(p, a) for (h, p), a in self._addr.items() if h == host and (peer is None or p == peer)]
        if len(mine) != 1:
            raise ValueError(f"{host} has {len(mine)} links matching peer={peer}; name the peer")
        return mine[0][1]

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def run(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        kwargs.setdefault("check", False)
        return subprocess.run([*self.prefix(host), *argv], **kwargs)

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen([*self.prefix(host), *argv], start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self._procs.clear()
        for ns in self.ns.values():
            # Deleting a namespace also removes its end of each veth pair, and with it the peer.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
