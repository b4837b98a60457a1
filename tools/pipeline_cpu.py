"""Where a file run's CPU goes: runs a command (usually `tools/pipeline_fps.py CLIP`), samples every thread of
it and of its child processes from /proc, and prints CPU seconds per thread over the window in which the
H.264 decoder threads were busy (the steady part of the run), with the cores used in all.

    python tools/pipeline_cpu.py .venv/bin/python tools/pipeline_fps.py out/bench-720p.mp4

Linux only. Divide by the frames to get CPU-ms a frame per stage: the detect worker's main thread
(detection, tracking, the gate, chips), its reader thread (BGR conversion), the decoder threads, the
inference worker. On a small machine the sum, not any one thread, bounds the frames a second. "waiting" is the
time a thread was runnable but every core was busy (/proc/.../schedstat); a process's total also counts threads
that ended inside the window (a library that starts a thread per frame shows up there).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        current = todo.pop()
        seen.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                try:
                    with open(f"/proc/{current}/task/{task}/children") as handle:
                        todo += [int(child) for child in handle.read().split()]
                except OSError:
                    pass
        except OSError:
            pass
    return seen


def _read_stat(path: str) -> tuple[str, float]:
    """The name and CPU seconds (user + system) in a /proc .../stat file."""
    with open(path) as handle:
        stat = handle.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], (int(fields[11]) + int(fields[12])) / TICK


def _sample(root: int) -> dict[tuple[int, int], tuple[str, float, float]]:
    """(pid, tid) -> (thread name, CPU seconds so far, seconds spent runnable but waiting for a core)."""
    snapshot = {}
    for pid in _descendants(root):
        try:
            snapshot[(pid, 0)] = ("PROCESS", _read_stat(f"/proc/{pid}/stat")[1], 0.0)  # tid 0: the whole process
            for task in os.listdir(f"/proc/{pid}/task"):
                name, cpu = _read_stat(f"/proc/{pid}/task/{task}/stat")
                with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                    waited = int(handle.read().split()[1]) / 1e9
                snapshot[(pid, int(task))] = (name, cpu, waited)
        except OSError:  # the thread or process ended between listing and reading
            pass
    return snapshot


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    child = subprocess.Popen(sys.argv[1:])
    series = []
    while child.poll() is None:
        series.append((time.monotonic(), _sample(child.pid)))
        time.sleep(0.05)
    decoding = [sum(cpu for name, cpu, _ in snap.values() if name.startswith("av:")) for _, snap in series]
    if not decoding or max(decoding) == 0:
        sys.exit("no decoder threads seen (not a PyAV file run?)")
    start = max(0, next(i for i, v in enumerate(decoding) if v > 0) - 1)
    end = decoding.index(max(decoding))
    (t0, before), (t1, after) = series[start], series[end]
    wall = t1 - t0
    per_thread, waiting, per_process = collections.Counter(), collections.Counter(), collections.Counter()
    for key, (name, cpu, waited) in after.items():
        _, cpu_before, waited_before = before.get(key, (name, 0.0, 0.0))
        if key[1] == 0:  # the process as a whole: its threads, ended ones included
            per_process[key[0]] += cpu - cpu_before
            continue
        per_thread[(key[0], f"{name}#{key[1]}")] += cpu - cpu_before
        waiting[(key[0], f"{name}#{key[1]}")] += waited - waited_before
    print(f"window {wall:.2f} s  (waiting: runnable, but no core was free)")
    for (pid, name), seconds in per_thread.most_common():
        if seconds >= 0.02:
            print(f"{seconds:6.2f} s  {100 * seconds / wall:5.1f}% of a core  waiting {waiting[(pid, name)]:5.2f} s"
                  f"  pid {pid}  {name}")
    for pid, seconds in per_process.most_common():
        if seconds < 0.02:
            continue
        ended = max(0.0, seconds - sum(v for (p, _), v in per_thread.items() if p == pid))
        print(f"process {pid}: {seconds:.2f} s in all ({ended:.2f} s in threads that ended within the window)")
    total = sum(per_process.values())
    print(f"total {total:.2f} s = {total / wall:.2f} cores")


if __name__ == "__main__":
    main()
