"""A real RTSP server on 127.0.0.1 for tests, built on GStreamer's RTSP server.

Two halves in one file:
- run as a script under the SYSTEM python (`/usr/bin/python3 tests/rtsp_server.py --port 8554 ...`), it serves
  a live test pattern or an H.264 .mp4 file and prints one `READY <url>` line once it listens. The `gi`
  bindings live only in the system python, never in the venv.
- imported from the venv (tests, fixtures), `RtspServer` launches that script in a child process and gives
  tests the handles they need to break it: `kill()` (crash), `freeze()`/`thaw()` (SIGSTOP/SIGCONT),
  `restart()` on the same port.

    with RtspServer(size=(320, 240), fps=15) as server:
        source = open_source(SourceSettings(url=server.url), "cam0", ReconnectSettings())

Needs the Debian packages in .ci/install-system-deps.sh; `rtsp_server_unavailable()` says why not, for skips.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
_READY = "READY "


# ----------------------------------------------------------------------------- venv side (tests)


@lru_cache(maxsize=1)
def rtsp_server_unavailable(python: str = SYSTEM_PYTHON) -> str | None:
    """None when the server can run here, otherwise the reason (for `pytest.skip`)."""
    if not Path(python).exists():
        return f"{python} not found (the GStreamer RTSP server needs the system python with gi)"
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
        "from gi.repository import Gst, GstRtspServer; Gst.init(None);"
        "missing = [e for e in ('videotestsrc', 'openh264enc', 'h264parse', 'rtph264pay', 'qtdemux')"
        " if Gst.ElementFactory.find(e) is None];"
        "print(' '.join(missing))"
    )
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"GStreamer RTSP server bindings missing ({last}); run .ci/install-system-deps.sh"
    if done.stdout.strip():
        return f"GStreamer elements missing: {done.stdout.strip()}; run .ci/install-system-deps.sh"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RtspServer:
    """A GStreamer RTSP server in a child process; a context manager that always cleans up.

    `file` serves an H.264 .mp4 (each client gets its own pipeline from the start of the file, paced at
    real time; the stream ends with the file); without it, a live `videotestsrc` pattern encoded by
    openh264 at `size` and `fps`, forever.
    """

    def __init__(
        self,
        *,
        file: str | Path | None = None,
        port: int | None = None,
        path: str = "stream",
        size: tuple[int, int] = (640, 360),
        fps: int = 30,
        python: str = SYSTEM_PYTHON,
        ready_timeout_s: float = 20.0,
    ) -> None:
        if file is not None and not Path(file).is_file():
            raise ValueError(f"RtspServer: file {file} does not exist")
        if size[0] <= 0 or size[1] <= 0 or fps <= 0:
            raise ValueError(f"RtspServer: expected positive size and fps, got size={size} fps={fps}")
        self.file = Path(file) if file is not None else None
        self.port = port or free_port()
        self.path = path.strip("/")
        self.size = size
        self.fps = fps
        self.python = python
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{self.path}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RtspServer:
        """Launch the server and wait until it listens; raises RuntimeError with its stderr if it fails."""
        if self.running:
            return self
        command = [
            self.python, str(Path(__file__).resolve()),
            "--port", str(self.port), "--path", self.path,
            "--size", f"{self.size[0]}x{self.size[1]}", "--fps", str(self.fps),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if self.file is not None:
            command += ["--file", str(self.file)]
        # A clean environment for GStreamer: the venv's variables must not leak into the system python.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        deadline = time.monotonic() + self.ready_timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=0.2):
                    if process.poll() is not None:
                        break
                    continue
                line = process.stdout.readline()
                if line.startswith(_READY):
                    return
                if not line and process.poll() is not None:
                    break
        self.stop()
        stderr = process.stderr.read() if process.stderr else ""
        raise RuntimeError(f"RTSP server on port {self.port} did not start: {stderr.strip()[-2000:]}")

    def kill(self) -> None:
        """Crash the server (SIGKILL): clients see the connection drop."""
        if self._process is not None:
            self._signal(signal.SIGCONT)  # a frozen process must be able to die
            self._process.kill()
            self._process.wait(timeout=10)
            self._close_pipes()
            self._process = None

    def freeze(self) -> None:
        """SIGSTOP: the socket stays open but nothing is sent (a hung camera)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), escalating to SIGKILL; idempotent."""
        process = self._process
        if process is None:
            return
        self._signal(signal.SIGCONT)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._close_pipes()
        self._process = None

    def restart(self) -> RtspServer:
        """Stop (or reap a killed server) and start again on the same port and path."""
        self.stop()
        return self.start()

    def _signal(self, signum: int) -> None:
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signum)

    def _close_pipes(self) -> None:
        if self._process is not None:
            for pipe in (self._process.stdout, self._process.stderr):
                if pipe is not None:
                    pipe.close()

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- server side (system python)


def _launch_line(args: argparse.Namespace) -> str:
    if args.file:
        # Already H.264 in an .mp4: no re-encoding, just repacketise.
        location = str(Path(args.file).resolve()).replace('"', '\\"')
        return f'( filesrc location="{location}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )'
    width, height = (int(v) for v in args.size.split("x"))
    # A key frame every half second: a client starts decoding at the first key frame after PLAY, so a
    # longer GOP only makes every (re)connect in the tests slower.
    gop = max(1, args.fps // 2)
    return (
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
        f"framerate={args.fps}/1 ! videoconvert ! openh264enc complexity=low gop-size={gop} "
        "! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Serve a test pattern or an .mp4 over RTSP on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="stream")
    parser.add_argument("--file", default=None, help="H.264 .mp4 to serve; default: a live test pattern")
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(_launch_line(args))
    factory.set_shared(False)  # every client starts its own pipeline, from a key frame
    server.get_mount_points().add_factory("/" + args.path.strip("/"), factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1

    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    if args.parent_pid:

        def _orphaned() -> bool:
            if os.getppid() != args.parent_pid:  # the test process died without stopping us
                loop.quit()
                return False
            return True

        GLib.timeout_add(1000, _orphaned)
    print(f"{_READY}rtsp://127.0.0.1:{args.port}/{args.path.strip('/')}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
