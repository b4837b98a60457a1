"""No orphans: a supervisor killed with SIGKILL (OOM killer, container stop) leaves no worker process and
no temporary folder behind. Real `streamer run` processes, pids read from /proc, a private TMPDIR."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.pipeline.run import OWNER_FILE, sweep_stale_folders
from test_pipeline import SAMPLE, Run

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def start_time(pid: int) -> str | None:
    """Start time of a running (not zombie) process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(root: int) -> dict[int, str]:
    """Every process below `root`, with its start time (so a reused pid is not mistaken for it)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            found[pid] = started
            todo.append(pid)
    return found


def running(processes: dict[int, str]) -> list[int]:
    return [pid for pid, started in processes.items() if start_time(pid) == started]


@pytest.fixture(scope="module")
def env(model_dir, cache_dir):
    return {**os.environ, "STREAMER_MODEL_DIR": str(model_dir), "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.mark.slow
def test_sigkill_of_the_supervisor_leaves_no_process_and_no_folder(env, tmp_path):
    private_tmp = tmp_path / "tmp"  # other runs' folders must not count, nor be touched
    private_tmp.mkdir()
    config = tmp_path / "loop.yaml"
    config.write_text(f"sources:\n  - url: {SAMPLE}\n    id: loop\n    loop: true\n    live: true\n")
    run = Run(["--config", str(config)], {**env, "TMPDIR": str(private_tmp), "STREAMER_PUBLISH__HEARTBEAT_S": "0.5"})
    tree: dict[int, str] = {}
    try:
        run.wait_for(lambda e: e.kind == "track.started", 120, "a track: both workers at work")
        run.wait_for(lambda e: e.kind == "heartbeat" and e.streams["loop"].frames > 0, 10, "a heartbeat")
        tree = descendants(run.process.pid)
        folders = list(private_tmp.glob("streamer-*"))
        assert len(tree) >= 2, tree  # detect and inference workers (and multiprocessing's resource tracker)
        assert len(folders) == 1 and (folders[0] / "events").exists(), folders

        killed_at = time.monotonic()
        run.process.kill()
        run.process.wait(10)
        deadline = killed_at + 3.0
        while (running(tree) or folders[0].exists()) and time.monotonic() < deadline:
            time.sleep(0.02)
        gone_after = time.monotonic() - killed_at
        assert not running(tree), f"still running {gone_after:.1f} s after the supervisor was killed: {running(tree)}"
        assert not list(private_tmp.glob("streamer-*")), "the supervisor's temporary folder was left behind"
        print(f"every worker gone and the folder removed {gone_after:.2f} s after SIGKILL of the supervisor")
    finally:
        for pid in running(tree):  # only what this test started
            os.kill(pid, 9)
        run.subscriber.close()


def test_a_new_supervisor_sweeps_folders_of_runs_that_are_gone(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    finished_started = start_time(finished.pid)
    finished.wait()
    me = f"{os.getpid()} {start_time(os.getpid())}"

    def folder(name: str, owner: str | None) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "events").write_text("")  # stands for an ipc socket file
        if owner is not None:
            (path / OWNER_FILE).write_text(owner + "\n")
        return path

    dead = folder("streamer-dead", f"{finished.pid} {finished_started}")
    reused = folder("streamer-reused", f"{os.getpid()} 1")  # our pid, but another process's start time
    alive = folder("streamer-alive", me)
    no_owner = folder("streamer-being-made", None)
    other = folder("other-dead", f"{finished.pid} {finished_started}")
    assert sorted(sweep_stale_folders(tmp_path)) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert alive.exists() and no_owner.exists() and other.exists()
