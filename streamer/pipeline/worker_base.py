"""What every worker process shares: telling the supervisor about a fatal error, and noticing that
the supervisor is gone (killed with SIGKILL, the OOM killer), so no worker outlives it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import zmq

from streamer.pipeline.messages import WorkerFatal, control_frames
from streamer.sockets import SocketKind, make_socket

PARENT_POLL_S = 0.5


def report_fatal(control_endpoint: str | None, worker: str, message: str) -> None:
    """One line for the supervisor to print before it exits non-zero (instead of restarting us)."""
    if control_endpoint is None:
        import sys

        print(f"streamer: error: {message}", file=sys.stderr)
        return
    socket = make_socket(zmq.Context.instance(), SocketKind.PUSH, hwm=10, connect=control_endpoint)
    socket.send_multipart(control_frames(WorkerFatal(worker=worker, message=message[:2000])))
    socket.close(linger=2000)


def watch_parent(on_orphaned: Callable[[], None], interval_s: float = PARENT_POLL_S) -> threading.Thread:
    """Call `on_orphaned` once when our parent process is gone (we are re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        on_orphaned()

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
