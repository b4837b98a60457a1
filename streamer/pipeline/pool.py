"""The detect-worker pool's bookkeeping in the supervisor: how many workers, which streams each holds,
their numbers as one, and one word per change about what they all share (inference, the gallery).

Streams are sharded over `pipeline.detect_workers` processes; all of them talk to the same inference
worker(s), which batch across every client, so batches still fill across all streams. The supervisor
keeps the shard of each stream: a crashed worker is restarted with its own shard only, a stream added at
run time goes to the worker holding the fewest, a command about a stream to the worker holding it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from streamer.models.runtime import cores
from streamer.pipeline.messages import WorkerStats


def detect_worker_count(setting: Literal["auto"] | int, streams: int, *, keep_running: bool = False,
                        preview: bool = False, cpus: int | None = None) -> int:
    """How many detect workers a run starts. `auto`: a core each but one (the inference worker and the
    supervisor need one), never more than streams, except serving (`keep_running`), where streams come
    later. A preview window is one process's (its keys stop the run): one worker. A number is taken as
    given, but a run of files never starts workers without a stream to give them."""
    if preview:
        return 1
    cpus = cpus or cores()
    if setting == "auto":
        count = cpus - 1
        return max(1, count if keep_running else min(streams, count))
    return setting if keep_running else max(1, min(setting, streams))


def shard(streams: Iterable[str], workers: int) -> list[list[str]]:
    """Streams dealt round robin: neighbours in the settings (often similar cameras) land apart."""
    shards: list[list[str]] = [[] for _ in range(workers)]
    for index, stream in enumerate(streams):
        shards[index % workers].append(stream)
    return shards


def least_loaded(loads: Mapping[int, int]) -> int:
    """The worker with the fewest streams (the lowest index on a tie)."""
    return min(loads, key=lambda index: (loads[index], index))


class StatusVotes:
    """Each worker's last word about a part they all share; subscribers hear of a change once, when the
    pool's view changes: `bad` while any worker says so, else `good`. Untold workers do not count."""

    def __init__(self, good: str, bad: str) -> None:
        self.good, self.bad = good, bad
        self._votes: dict[int, str] = {}

    def vote(self, worker: int, state: str) -> str:
        """Record one worker's state; the pool's."""
        self._votes[worker] = state
        return self.state

    def forget(self, worker: int) -> None:
        """A worker that is gone (restarted: the new process knows nothing yet) has no say."""
        self._votes.pop(worker, None)

    @property
    def state(self) -> str:
        return self.bad if self.bad in self._votes.values() else self.good


_COUNTERS = ("faces_sent", "faces_embedded", "faces_dropped")


@dataclass
class _Shard:
    """One worker slot's numbers: its current process's last stats, and what its dead processes reached."""

    pid: int | None = None
    last: WorkerStats | None = None
    base: dict[str, int] = field(default_factory=dict)  # counters and *_dropped/_expired queues
    base_histograms: dict[str, tuple[list[int], float]] = field(default_factory=dict)
    ever_up: bool = False
    retired: set[int] = field(default_factory=set)

    def observe(self, stats: WorkerStats) -> bool:
        """False for a late message of a process this slot has replaced (its totals are in `base`)."""
        if stats.pid is not None and stats.pid in self.retired:
            return False
        if self.last is not None and stats.pid != self.pid:
            self._retire()
        self.pid, self.last = stats.pid, stats
        self.ever_up = self.ever_up or stats.inference_ever_up
        return True

    def _retire(self) -> None:
        last = self.last
        assert last is not None
        if self.pid is not None:
            self.retired.add(self.pid)
        for name in _COUNTERS:
            self.base[name] = self.base.get(name, 0) + getattr(last, name)
        for name, value in last.queues.items():
            if name.endswith(("_dropped", "_expired")):
                self.base[name] = self.base.get(name, 0) + value
        for name, snapshot in last.histograms.items():
            counts, total = self.base_histograms.get(name, ([0] * len(snapshot.counts), 0.0))
            if len(counts) == len(snapshot.counts):
                self.base_histograms[name] = ([a + b for a, b in zip(counts, snapshot.counts)], total + snapshot.sum)


class PoolStats:
    """The detect workers' stats as one WorkerStats, as if one process had sent it: streams side by side,
    counters and histograms summed and kept across restarts (so they only grow: Prometheus counters), the
    inference state as StatusVotes would say it."""

    def __init__(self, workers: int, pid: int) -> None:
        self._shards = {index: _Shard() for index in range(workers)}
        self.pid = pid  # the merged stats are the supervisor's: one pid for the metrics' totals

    def observe(self, worker: int, stats: WorkerStats) -> WorkerStats | None:
        """Take one worker's stats; the pool's, or None when they were stale."""
        if not self._shards[worker].observe(stats):
            return None
        return self.merged()

    def forget_streams(self, worker: int) -> None:
        """The worker died: its streams are not reported until its successor says how they are."""
        shard = self._shards[worker]
        if shard.last is not None:
            shard.last = shard.last.model_copy(update={"streams": {}})

    def merged(self) -> WorkerStats:
        from streamer.pipeline.metrics import HistogramSnapshot

        lasts = [(s, s.last) for s in self._shards.values() if s.last is not None]
        totals: dict[str, int] = {}
        queues: dict[str, int] = {}
        histograms: dict[str, tuple[tuple[float, ...], list[int], float]] = {}
        streams: dict[str, Any] = {}
        for shard, last in lasts:
            streams.update(last.streams)
            for name in _COUNTERS:
                totals[name] = totals.get(name, 0) + getattr(last, name)
            for name, value in last.queues.items():
                queues[name] = queues.get(name, 0) + value
            for name, snapshot in last.histograms.items():
                bounds, counts, total = histograms.get(name, (snapshot.bounds, [0] * len(snapshot.counts), 0.0))
                if bounds == snapshot.bounds:
                    histograms[name] = (bounds, [a + b for a, b in zip(counts, snapshot.counts)], total + snapshot.sum)
        for shard in self._shards.values():
            for name, value in shard.base.items():
                target = totals if name in _COUNTERS else queues
                target[name] = target.get(name, 0) + value
            for name, (counts, total) in shard.base_histograms.items():
                if name in histograms and len(histograms[name][1]) == len(counts):
                    bounds, now, now_sum = histograms[name]
                    histograms[name] = (bounds, [a + b for a, b in zip(now, counts)], now_sum + total)
        states = [last.inference for _, last in lasts]
        inference = "down" if "down" in states else "up" if "up" in states else "starting"
        detail = next((last.inference_detail for _, last in lasts if last.inference == inference), "")
        firsts = [last.first_frame_at for _, last in lasts if last.first_frame_at is not None]
        lasts_at = [last.last_frame_at for _, last in lasts if last.last_frame_at is not None]
        return WorkerStats(
            worker="detect",
            streams=streams,
            queues=queues,
            **{name: totals.get(name, 0) for name in _COUNTERS},
            first_frame_at=min(firsts) if firsts else None,
            last_frame_at=max(lasts_at) if lasts_at else None,
            inference=inference,  # type: ignore[arg-type]
            inference_detail=detail,
            inference_ever_up=any(s.ever_up for s in self._shards.values()),
            pid=self.pid,
            histograms={name: HistogramSnapshot(bounds=bounds, counts=tuple(counts), sum=total)
                        for name, (bounds, counts, total) in histograms.items()},
        )
