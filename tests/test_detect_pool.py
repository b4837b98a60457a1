"""`pipeline.detect_workers`: streams sharded over several detect workers that share one inference worker.
Real supervisors (in a thread of this process), real worker processes, models and clips."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from streamer.config import load_settings
from streamer.pipeline.messages import StreamStats, WorkerStats
from streamer.pipeline.pool import (
    PoolStats,
    StatusVotes,
    detect_worker_count,
    least_loaded,
    shard,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_videos" / "astronaut.mp4"
SAMPLE_STILL = REPO / "sample_videos" / "astronaut.jpg"
HAMILTON = "face_recognition/examples/short_hamilton_clip.mp4"
ARCADE = "facenet_pytorch/examples/video.mp4"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, media_dir, model_dir, cache_dir) -> Path:
    from streamer.engine import FaceEngine
    from streamer.match.gallery import Gallery

    path = tmp_path_factory.mktemp("gallery") / "people.db"
    settings = load_settings(overrides={"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}})
    with FaceEngine(settings) as engine, Gallery(path) as people:
        engine.enroll(people, "Lin-Manuel Miranda", [media_dir / "face_recognition/examples/lin-manuel-miranda.png"])
        engine.enroll(people, "Eileen Collins", [SAMPLE_STILL])
    return path


def settings_for(model_dir, cache_dir, gallery, sources, workers, **extra):
    return load_settings(overrides={
        "model_dir": str(model_dir),
        "models": {"cache_dir": str(cache_dir)},
        "gallery": {"path": str(gallery)},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0.5, "track_update_s": 0.2},
        "sources": sources,
        "pipeline": {"detect_workers": workers},
        **extra,
    })


class Pipeline:
    """A supervisor running in a thread, with every event it published (as its tap got them)."""

    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor
        self.events: list = []
        self.error: BaseException | None = None
        self.summary = None
        supervisor.add_tap(lambda event, crop: self.events.append(event))
        self.thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def _run(self) -> None:
        try:
            self.summary = self.supervisor.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait(self, predicate, timeout: float, what: str, after: int = 0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if event.seq > after and predicate(event):
                    return event
            assert self.thread.is_alive(), f"the supervisor stopped: {self.error!r}"
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


def check_invariants(events: list) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "seq skipped or repeated"
    started = Counter((e.stream, e.track) for e in events if e.kind == "track.started")
    ended = Counter((e.stream, e.track) for e in events if e.kind == "track.ended")
    assert max(started.values(), default=1) == 1, "a track id started twice in one stream"
    assert started == ended, "every started track must end, once"


def run_files(model_dir, cache_dir, gallery, media_dir, workers: int) -> Pipeline:
    sources = [
        {"url": str(SAMPLE), "id": "lobby"},
        {"url": str(media_dir / HAMILTON), "id": "stage"},
        {"url": str(media_dir / ARCADE), "id": "arcade", "max_frames": 50},
    ]
    from streamer.pipeline.run import Supervisor

    run = Pipeline(Supervisor(settings_for(model_dir, cache_dir, gallery, sources, workers)))
    assert len(run.supervisor.detects) == workers
    run.thread.start()
    run.thread.join(120)
    assert not run.thread.is_alive() and run.error is None, repr(run.error)
    return run


def test_three_streams_over_two_workers_as_with_one(model_dir, cache_dir, gallery, media_dir):
    pool = run_files(model_dir, cache_dir, gallery, media_dir, 2)
    assert sorted(pool.supervisor._holder.items()) == [("arcade", 0), ("lobby", 0), ("stage", 1)]
    check_invariants(pool.events)
    ended = {e.stream for e in pool.events if e.kind == "stream.status" and e.status == "ended"}
    assert ended == {"lobby", "stage", "arcade"}
    assert {k: v["frames"] for k, v in pool.summary.last_stats["streams"].items()} == {
        "lobby": 240, "stage": 275, "arcade": 50}
    assert pool.summary.frames == 240 + 275 + 50
    inference = [e for e in pool.events if e.kind == "pipeline.status" and e.inference]
    assert not inference, "inference stayed up: nothing to say, from either worker"
    # Metrics see the pool as one: each family once, totals of both workers.
    families = list(pool.supervisor.metrics.collect())
    names = [family.name for family in families]
    assert len(names) == len(set(names)), names
    by_name = {family.name: family for family in families}
    assert by_name["streamer_faces_sent"].samples[0].value == pool.summary.faces_sent
    frames = {s.labels["stream"]: s.value for s in by_name["streamer_stream_frames"].samples}
    assert frames == {"lobby": 240, "stage": 275, "arcade": 50}

    def detections(run) -> float:
        family = next(f for f in run.supervisor.metrics.collect() if f.name == "streamer_detection_seconds")
        return next(s.value for s in family.samples if s.name.endswith("_count"))

    one = run_files(model_dir, cache_dir, gallery, media_dir, 1)
    check_invariants(one.events)

    def tracks(events):
        return {s: sorted(e.track for e in events if e.kind == "track.started" and e.stream == s)
                for s in ("lobby", "stage", "arcade")}

    def names(events):
        return {(e.stream, e.track, e.name) for e in events if e.kind == "identity"}

    assert tracks(pool.events) == tracks(one.events)
    assert names(pool.events) == names(one.events)
    named = {(stream, name) for stream, _, name in names(pool.events) if name}
    # Who is recognised where is the recognition's business (tests/test_pipeline.py); here: the pool finds them.
    assert {("lobby", "Eileen Collins"), ("stage", "Lin-Manuel Miranda")} <= named
    assert pool.summary.faces_sent == one.summary.faces_sent > 0
    assert pool.summary.faces_embedded == one.summary.faces_embedded
    assert detections(pool) == detections(one) > 0, "both workers' detection times are in the histogram"


def test_killed_worker_restarts_with_its_shard_and_a_runtime_source_lands(model_dir, cache_dir, gallery,
                                                                           media_dir):
    from streamer.pipeline.run import Supervisor

    sources = [
        {"url": str(SAMPLE), "id": "lobby", "live": True, "loop": True},
        {"url": str(media_dir / HAMILTON), "id": "stage", "live": True, "loop": True},
    ]
    run = Pipeline(Supervisor(settings_for(model_dir, cache_dir, gallery, sources, 2)))
    supervisor = run.supervisor
    run.thread.start()
    try:
        for stream in ("lobby", "stage"):
            run.wait(lambda e, s=stream: e.kind == "track.started" and e.stream == s, 90, f"a track on {stream}")
        victim = supervisor._holder["stage"]
        other = 1 - victim
        pids = [worker.process.pid for worker in supervisor.detects]
        before = len(run.events)
        os.kill(pids[victim], signal.SIGKILL)
        lost = run.wait(lambda e: e.kind == "stream.status" and e.status == "lost" and "crashed" in e.detail,
                        30, "the crash reported", after=before)
        assert lost.stream == "stage"
        back = run.wait(lambda e: e.kind == "stream.status" and e.stream == "stage" and e.status == "connected",
                        60, "the restarted worker's stream", after=lost.seq)
        between = [e for e in run.events if lost.seq < e.seq < back.seq]
        assert any(e.stream == "lobby" and e.kind.startswith("track.") for e in between), \
            "the other shard's stream must go on publishing while the killed worker restarts"
        orphans = {e.stream for e in run.events[before:] if e.kind == "track.ended" and e.reason == "worker_restart"}
        assert orphans <= {"stage"}
        assert not [e for e in run.events[before:] if e.kind == "stream.status" and e.stream == "lobby"]
        new_pids = [worker.process.pid for worker in supervisor.detects]
        assert new_pids[other] == pids[other] and new_pids[victim] != pids[victim]
        assert supervisor.summary.restarts["detect"] == 1
        assert sorted(supervisor._holder.items()) == sorted({"lobby": other, "stage": victim}.items())
        stage_before = {e.track for e in run.events[:before] if e.kind == "track.started" and e.stream == "stage"}
        later = run.wait(lambda e: e.kind == "track.started" and e.stream == "stage", 60, "a track after the restart",
                         after=back.seq)
        assert later.track > max(stage_before), "track ids are never reused in a stream"

        # A stream added at run time goes to the worker holding the fewest (a tie: the first) and works.
        assert supervisor.add_source({"url": str(SAMPLE), "id": "door", "live": True, "loop": True}) == "door"
        run.wait(lambda e: e.kind == "track.started" and e.stream == "door", 60, "a track on the added stream")
        assert supervisor._holder["door"] == 0
        assert {view.id for view in supervisor.streams()} == {"lobby", "stage", "door"}
        supervisor.remove_source("door")
        run.wait(lambda e: e.kind == "stream.status" and e.stream == "door" and e.status == "ended", 30,
                 "the added stream removed")
        assert "door" not in supervisor._holder
        # The shards report on their own clocks: a heartbeat may come before the restarted one's first numbers.
        run.wait(lambda e: e.kind == "heartbeat" and set(e.streams) == {"lobby", "stage"}
                 and all(info.frames > 0 for info in e.streams.values()), 20,
                 "a heartbeat with both shards' frames", after=len(run.events))
    finally:
        supervisor.request_stop()
        run.thread.join(60)
    assert not run.thread.is_alive() and run.error is None, repr(run.error)
    check_invariants(run.events)
    assert all(not worker.alive for worker in supervisor.detects)


# -- units (no processes) -----------------------------------------------------------------------------------
def test_worker_count_follows_cores_and_streams():
    assert detect_worker_count("auto", 3, cpus=2) == 1
    assert detect_worker_count("auto", 3, cpus=8) == 3
    assert detect_worker_count("auto", 30, cpus=8) == 7
    assert detect_worker_count("auto", 0, cpus=8, keep_running=True) == 7  # serving: sources come later
    assert detect_worker_count(4, 2) == 2 and detect_worker_count(4, 0, keep_running=True) == 4
    assert detect_worker_count("auto", 5, cpus=8, preview=True) == 1
    assert shard(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert least_loaded({0: 2, 1: 1, 2: 1}) == 1


def test_detect_workers_setting_is_checked(monkeypatch):
    from streamer.errors import ConfigError

    for bad in ("0", "65", "many", "-1"):
        monkeypatch.setenv("STREAMER_PIPELINE__DETECT_WORKERS", bad)
        with pytest.raises(ConfigError, match=r"pipeline\.detect_workers.*auto or a number from 1 to 64"):
            load_settings()
    monkeypatch.setenv("STREAMER_PIPELINE__DETECT_WORKERS", "3")
    assert load_settings().pipeline.detect_workers == 3
    monkeypatch.delenv("STREAMER_PIPELINE__DETECT_WORKERS")
    assert load_settings().pipeline.detect_workers == "auto"


def test_status_votes_say_each_change_once():
    votes = StatusVotes("up", "down")
    assert votes.vote(0, "down") == "down" and votes.vote(1, "down") == "down"
    assert votes.vote(0, "up") == "down", "still down while any worker says so"
    assert votes.vote(1, "up") == "up"
    votes.vote(1, "down")
    votes.forget(1)
    assert votes.state == "up"


def _stats(pid: int, frames: int, sent: int, dropped: int = 0, inference: str = "up") -> WorkerStats:
    stream = StreamStats(fps=1.0, frames=frames, dropped=0, status="connected", reconnects=0)
    return WorkerStats(worker="detect", streams={f"s{pid}": stream}, faces_sent=sent, pid=pid,
                       queues={"inference_pending": 1, "inference_dropped": dropped}, inference=inference)


def test_pool_stats_sum_workers_and_keep_totals_across_restarts():
    pool = PoolStats(2, pid=1)
    pool.observe(0, _stats(10, 5, 3))
    merged = pool.observe(1, _stats(20, 7, 4, dropped=2, inference="down"))
    assert set(merged.streams) == {"s10", "s20"} and merged.faces_sent == 7
    assert merged.queues == {"inference_pending": 2, "inference_dropped": 2}
    assert merged.inference == "down" and merged.pid == 1
    pool.forget_streams(1)  # worker 1 died; its successor starts from 0
    merged = pool.observe(1, _stats(21, 1, 1))
    assert set(merged.streams) == {"s10", "s21"}
    assert merged.faces_sent == 3 + 4 + 1 and merged.queues["inference_dropped"] == 2
    assert merged.inference == "up"
    assert pool.observe(1, _stats(20, 9, 9)) is None, "late news of the replaced process is ignored"


def test_no_source_of_the_pool_connecting_is_one_error(model_dir, cache_dir, gallery):
    """Each worker holds one unreachable camera: the run fails as one worker alone would, naming both."""
    from streamer.errors import SourceError
    from streamer.pipeline.run import Supervisor

    sources = [{"url": "rtsp://127.0.0.1:9/a", "id": "north"}, {"url": "rtsp://127.0.0.1:9/b", "id": "south"}]
    supervisor = Supervisor(settings_for(model_dir, cache_dir, gallery, sources, 2,
                                         reconnect={"initial_delay_s": 0.2, "max_delay_s": 0.5}))
    assert len(supervisor.detects) == 2
    with pytest.raises(SourceError, match=r"cannot connect to any source: north \(.*\); south \(.*exit_if_none"):
        supervisor.run()
    assert all(not worker.alive for worker in supervisor.detects)
