"""Soak: run streamer for minutes on a live looped clip and an RTSP camera while faults are injected.

    python tools/soak.py --minutes 20            (what `make soak` runs; SOAK_MINUTES=3 for a short one)

Two sources: the sample clip as a live, looped file (the astronaut, enrolled, so identities flow) and an
RTSP test-pattern camera served by tests/rtsp_server.py (GStreamer, see .ci/install-system-deps.sh). A
subscriber takes every event. Faults come in a fixed cycle, one every `--every` seconds:

    kill-detect      SIGKILL the detect worker          recovered: next identity event
    kill-inference   SIGKILL the inference worker       recovered: next identity or attributes event
    stop-detect      SIGSTOP the detect worker past frame_timeout_s, then SIGCONT
                                                        recovered: next identity event
    replace-gallery  `mv` a gallery without the astronaut over the file
                                                        recovered: next identity event with no name
    restore-gallery  `mv` the original gallery back     recovered: next identity naming her
    restart-camera   restart the RTSP server            recovered: stream.status reconnected for it

At the end: per-process RSS (MiB) at the start (after warm-up) and at the end, events by kind, seq gaps
and messages missed as the subscriber counted them, and each fault's recovery time. One JSON object on
stdout (--json) or a table. Exit 1 when a fault never recovered within `--every` seconds or a gap was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the RTSP test server lives beside the tests

from rtsp_server import RtspServer, free_port, rtsp_server_unavailable  # noqa: E402

from streamer.publish.subscriber import EventSubscriber  # noqa: E402

CLIP = REPO / "sample_videos" / "astronaut.mp4"
PORTRAIT = REPO / "sample_videos" / "astronaut.jpg"
PERSON = "Eileen Collins"
STREAMER = [sys.executable, "-m", "streamer"]
WORKER_LINE = re.compile(r"started (\w+) worker \(pid (\d+)\)")
FRAME_TIMEOUT_S = 2.0


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Run:
    """The `streamer run` under test: its stderr is read for worker pids, its events by a subscriber."""

    def __init__(self, work: Path, camera_url: str | None) -> None:
        self.work = work
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        sources = [f"  - {{url: {json.dumps(str(CLIP))}, id: lobby, live: true, loop: true}}"]
        if camera_url:
            sources.append(f"  - {{url: {json.dumps(camera_url)}, id: door}}")
        config = work / "soak.yaml"
        config.write_text(
            "sources:\n" + "\n".join(sources) + "\n"
            f"reconnect: {{frame_timeout_s: {FRAME_TIMEOUT_S}, max_delay_s: 2}}\n"
            f"publish: {{endpoint: {json.dumps(self.endpoint)}}}\n"
        )
        self.workers: dict[str, int] = {}
        self.log_tail: list[str] = []
        self.process = subprocess.Popen(
            [*STREAMER, "run", "--config", str(config), "--gallery", str(work / "people.db"), "-v"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=work,
        )  # fmt: skip
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            found = WORKER_LINE.search(line)
            if found:
                self.workers[found.group(1)] = int(found.group(2))
            self.log_tail = (self.log_tail + [line.rstrip()])[-50:]

    def pids(self) -> dict[str, int]:
        return {"supervisor": self.process.pid, **self.workers}

    def rss(self) -> dict[str, float | None]:
        return {name: rss_mib(pid) for name, pid in self.pids().items()}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


class Events(threading.Thread):
    """Every event, kept as (monotonic time, kind, stream, name) for the recovery checks."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.subscriber = EventSubscriber(endpoint, timeout_ms=200)
        self.seen: list[tuple[float, str, str, str | None]] = []
        self.kinds: Counter[str] = Counter()
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            event = self.subscriber.receive(200)
            if event is None:
                continue
            with self.lock:
                self.kinds[event.kind] += 1
                name = getattr(event, "name", None)
                status = getattr(event, "status", None)
                self.seen.append((time.monotonic(), event.kind, event.stream, name if event.kind == "identity" else status))

    def first_after(self, since: float, test) -> float | None:  # noqa: ANN001
        with self.lock:
            for at, kind, stream, value in self.seen:
                if at > since and test(kind, stream, value):
                    return at - since
        return None


def identity(kind: str, stream: str, value: str | None) -> bool:
    return kind == "identity" and stream == "lobby"


def recognised(kind: str, stream: str, value: str | None) -> bool:
    return identity(kind, stream, value) and value == PERSON


def stranger(kind: str, stream: str, value: str | None) -> bool:
    return identity(kind, stream, value) and value is None


def inferred(kind: str, stream: str, value: str | None) -> bool:
    return kind in ("identity", "attributes") and stream == "lobby"


def camera_back(kind: str, stream: str, value: str | None) -> bool:
    return kind == "stream.status" and stream == "door" and value in ("connected", "reconnected")


def enrol(gallery: Path, work: Path) -> None:
    subprocess.run([*STREAMER, "gallery", "add", PERSON, str(PORTRAIT), "--gallery", str(gallery)],
                   check=True, capture_output=True, cwd=work)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between faults (and recovery limit)")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before the first fault and the start RSS")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    gallery = work / "people.db"
    enrol(gallery, work)
    shutil.copy(gallery, work / "original.db")
    without = work / "without.db"  # the same gallery with her removed: she must turn unknown
    shutil.copy(gallery, without)
    subprocess.run([*STREAMER, "gallery", "remove", PERSON, "--gallery", str(without)],
                   check=True, capture_output=True, cwd=work)  # fmt: skip

    camera = None
    if rtsp_server_unavailable() is None:
        camera = RtspServer(size=(640, 360), fps=15).start()
    else:
        print(f"soak: no RTSP camera ({rtsp_server_unavailable()}); restart-camera is skipped", file=sys.stderr)

    run = Run(work, camera.url if camera else None)
    events = Events(run.endpoint)
    events.start()
    faults = ["kill-detect", "kill-inference", "stop-detect", "replace-gallery", "restore-gallery"]
    if camera:
        faults.append("restart-camera")
    checks = {
        "kill-detect": identity, "kill-inference": inferred, "stop-detect": identity,
        "replace-gallery": stranger, "restore-gallery": recognised, "restart-camera": camera_back,
    }  # fmt: skip
    results: list[dict] = []
    started = time.monotonic()
    end = started + args.minutes * 60
    try:
        time.sleep(args.warmup)
        rss_start = run.rss()
        rss_end = rss_start
        step = 0
        while time.monotonic() + args.every < end and run.process.poll() is None:
            fault = faults[step % len(faults)]
            step += 1
            at = time.monotonic()
            if fault == "kill-detect":
                os.kill(run.workers["detect"], signal.SIGKILL)
            elif fault == "kill-inference":
                os.kill(run.workers["inference"], signal.SIGKILL)
            elif fault == "stop-detect":
                pid = run.workers["detect"]
                os.kill(pid, signal.SIGSTOP)
                time.sleep(FRAME_TIMEOUT_S * 2)
                os.kill(pid, signal.SIGCONT)
            elif fault == "replace-gallery":
                shutil.copy(without, work / "next.db")
                os.replace(work / "next.db", gallery)
            elif fault == "restore-gallery":
                shutil.copy(work / "original.db", work / "next.db")
                os.replace(work / "next.db", gallery)
            elif fault == "restart-camera":
                camera.restart()
            time.sleep(args.every - (time.monotonic() - at))
            recovery = events.first_after(at, checks[fault])
            if run.process.poll() is None:
                rss_end = run.rss()  # the last reading while it ran, whatever ends the soak
            results.append({"fault": fault, "at_s": round(at - started, 1),
                            "recovered_s": None if recovery is None else round(recovery, 2)})  # fmt: skip
        if run.process.poll() is None:
            rss_end = run.rss()
    finally:
        code = run.stop()
        events.stop_flag.set()
        events.join(timeout=5)
        if camera:
            camera.stop()
    subscriber = events.subscriber
    report = {
        "minutes": round((time.monotonic() - started) / 60, 1),
        "exit_code": code,
        "rss_mib": {"start": rss_start, "end": rss_end},
        "events": dict(events.kinds),
        "seq_gaps": subscriber.gaps,
        "missed": subscriber.missed,
        "invalid": subscriber.invalid,
        "faults": results,
    }
    subscriber.close()
    failed = [r for r in results if r["recovered_s"] is None]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"soak: {report['minutes']} min, exit {code}, events {sum(events.kinds.values())} {dict(events.kinds)}")
        print(f"seq gaps {subscriber.gaps}, missed {subscriber.missed}, invalid {subscriber.invalid}")
        for name in rss_start:
            print(f"rss {name:<10} start {rss_start[name] or 0:7.1f} MiB   end {rss_end.get(name) or 0:7.1f} MiB")
        for r in results:
            shown = "NOT RECOVERED" if r["recovered_s"] is None else f"{r['recovered_s']:.2f} s"
            print(f"t={r['at_s']:7.1f}s  {r['fault']:<16} recovered in {shown}")
    if failed or subscriber.gaps:
        print("soak: last log lines of the run:\n  " + "\n  ".join(run.log_tail[-15:]), file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed or subscriber.gaps else 0


if __name__ == "__main__":
    sys.exit(main())
