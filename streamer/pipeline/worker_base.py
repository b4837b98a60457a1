"""What every worker process shares: telling the supervisor about a fatal error, and noticing that
the supervisor is gone (killed with SIGKILL, the OOM killer, a container stop), so no worker outlives it.

A supervisor killed that way cleans nothing up, so its workers do it: on Linux the kernel sends them
PARENT_DEATH_SIGNAL the moment it dies (prctl PR_SET_PDEATHSIG); elsewhere, and as a fallback, a thread
watches the parent pid. Either way the worker stops (no drain: nobody is left to publish to), closes its
sockets, which frees its ports, and removes the supervisor's temporary folder (its ipc sockets). A worker
still busy ORPHAN_EXIT_S later is ended by force, after the same clean-up; one still loading its models
(nothing to save yet) ends at once.

Python runs a signal handler only between bytecodes, so a C call that holds the GIL (parsing a large
ONNX file at start-up) delays the notice by as long as that call lasts; in the processing loop it is
immediate. Folders that even this misses (every process killed at once) are swept by the next
supervisor (`streamer.pipeline.run.sweep_stale_folders`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from streamer.pipeline.messages import WorkerFatal, control_frames
from streamer.sockets import SocketKind, make_socket

log = logging.getLogger(__name__)

PARENT_POLL_S = 0.25
PARENT_DEATH_SIGNAL = signal.SIGUSR1  # not SIGTERM: that one means "drain and stop" from a live supervisor
ORPHAN_EXIT_S = 1.5
TEMP_PREFIX = "streamer-"  # the supervisor's folder; nothing else is ever removed
_PR_SET_PDEATHSIG = 1


def report_fatal(control_endpoint: str | None, worker: str, message: str) -> None:
    """One line for the supervisor to print before it exits non-zero (instead of restarting us)."""
    if control_endpoint is None:
        print(f"streamer: error: {message}", file=sys.stderr)
        return
    socket = make_socket(zmq.Context.instance(), SocketKind.PUSH, hwm=10, connect=control_endpoint)
    socket.send_multipart(control_frames(WorkerFatal(worker=worker, message=message[:2000])))
    socket.close(linger=2000)


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` when our parent dies (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def remove_temp_folder(folder: str | Path | None) -> None:
    """Remove the supervisor's temporary folder; anything not named like one is left alone."""
    if folder is None:
        return
    path = Path(folder)
    if path.name.startswith(TEMP_PREFIX) and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # the other worker may be removing it too


class OrphanGuard:
    """Notices that the supervisor is gone. Until `attach(stop)` (the worker is built) that ends the process
    at once; after it, `stop` is called once and the process has ORPHAN_EXIT_S to end by itself. `finish()`
    does the clean-up on the way out."""

    def __init__(self, temp_folder: str | Path | None = None, *, parent_pid: int | None = None,
                 interval_s: float = PARENT_POLL_S, exit_after_s: float = ORPHAN_EXIT_S) -> None:
        self.on_orphaned: Callable[[], None] | None = None
        self.temp_folder = temp_folder
        self.parent_pid = parent_pid if parent_pid is not None else _expected_parent()
        self.interval_s = interval_s
        self.exit_after_s = exit_after_s
        self.orphaned = threading.Event()
        self._lock = threading.RLock()  # the signal handler may interrupt the thread that holds it

    def start(self) -> OrphanGuard:
        if threading.current_thread() is threading.main_thread():
            signal.signal(PARENT_DEATH_SIGNAL, self._on_signal)
            set_parent_death_signal(PARENT_DEATH_SIGNAL)
        if os.getppid() != self.parent_pid:  # it died before the signal was asked for
            self._notice("parent pid")
        threading.Thread(target=self._watch, name="parent-watch", daemon=True).start()
        return self

    def attach(self, stop: Callable[[], None]) -> None:
        """From now on, an orphaned worker stops by itself (`stop`), e.g. to finish its output file."""
        with self._lock:
            self.on_orphaned = stop
            orphaned = self.orphaned.is_set()
        if orphaned:
            stop()

    def finish(self) -> None:
        """On the way out: after orphaning, nobody else will remove the supervisor's folder."""
        if self.orphaned.is_set():
            remove_temp_folder(self.temp_folder)

    def _on_signal(self, *_: object) -> None:
        # A handler interrupts the main thread anywhere, even inside a write to stderr: do the work elsewhere.
        threading.Thread(target=self._notice, args=("parent-death signal",), name="orphaned", daemon=True).start()

    def _watch(self) -> None:
        while not self.orphaned.is_set():
            if os.getppid() != self.parent_pid:
                self._notice("parent pid")
                return
            time.sleep(self.interval_s)

    def _notice(self, how: str) -> None:
        with self._lock:
            if self.orphaned.is_set():
                return
            self.orphaned.set()
            stop = self.on_orphaned
        log.info("the supervisor (pid %d) is gone (%s): stopping", self.parent_pid, how)
        if stop is None:  # still loading: nothing to finish
            self._exit()
        threading.Thread(target=self._force_exit, name="orphan-exit", daemon=True).start()
        stop()

    def _force_exit(self) -> None:
        time.sleep(self.exit_after_s)
        self._exit()  # still here: something blocks the main thread (a batch, a stuck decoder)

    def _exit(self) -> None:
        remove_temp_folder(self.temp_folder)
        os._exit(1)


def _expected_parent() -> int:
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()
