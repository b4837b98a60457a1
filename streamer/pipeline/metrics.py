"""Prometheus metrics for the whole process tree, served by the supervisor (`metrics.bind`).

Workers do not serve metrics themselves: they already send `WorkerStats` on the control channel, and
those carry their counters and histogram buckets as typed, validated values (`HistogramSnapshot`). The
supervisor turns the latest of each into metric families when Prometheus scrapes. This keeps one port for
the tree, no shared files (prometheus_client's multiprocess mode would need a writable folder that
survives worker restarts and a cleanup of dead pids) and no trust in what arrives: a snapshot that does
not validate is dropped like any other malformed control message.

Counters survive worker restarts: a worker's cumulative totals start again at 0 in a new process, so the
supervisor keeps what the old process had reached (`_Cumulative`, keyed by pid) and adds.

Labels never carry a person's name (every scraper would learn who was seen): identities are counted as
`known`/`unknown` only. Stream ids, event kinds, process and queue names are operator-chosen or fixed.
"""

from __future__ import annotations

import bisect
import hmac
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

# Bucket bounds, in the metric's unit. Detection on one core is 5-30 ms a frame; an inference round trip
# includes batching waits, hence the longer tail; batch sizes are capped by inference.max_batch.
DETECT_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0)
INFERENCE_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_FACES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

MAX_BUCKETS = 64
STREAM_STATUSES = ("connecting", "connected", "lost", "reconnected", "ended")


class HistogramSnapshot(BaseModel):
    """Cumulative observations of one histogram in one process: per-bucket counts (the last is +Inf)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    bounds: tuple[float, ...] = Field(max_length=MAX_BUCKETS)
    counts: tuple[int, ...] = Field(max_length=MAX_BUCKETS + 1)
    sum: float = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> HistogramSnapshot:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"expected {len(self.bounds) + 1} counts for {len(self.bounds)} bounds")
        if any(b <= a for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError("bounds must increase")
        if any(c < 0 for c in self.counts):
            raise ValueError("counts must be >= 0")
        return self

    @property
    def count(self) -> int:
        return sum(self.counts)


class Buckets:
    """A histogram kept by a worker; `snapshot()` goes into its WorkerStats. Not thread-safe (one loop)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)) or len(bounds) > MAX_BUCKETS:
            raise ValueError(f"bounds: expected 1 to {MAX_BUCKETS} increasing values, got {bounds!r}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            return  # a clock step or a bug elsewhere must not poison the series
        # Prometheus buckets are "le": a value equal to a bound belongs to that bound's bucket.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(bounds=self.bounds, counts=tuple(self.counts), sum=self.sum)


@dataclass
class _Cumulative:
    """A total that a process reports from 0 again after a restart: what dead processes reached is kept."""

    base: float = 0.0
    pid: int | None = None
    last: float = 0.0

    def update(self, pid: int | None, value: float) -> None:
        if pid != self.pid or value < self.last:  # a new process (or, without a pid, a reset)
            self.base += self.last
            self.pid = pid
        self.last = value

    @property
    def total(self) -> float:
        return self.base + self.last


@dataclass
class _HistogramTotal:
    """A histogram summed over the processes that ever reported it (same reasoning as _Cumulative)."""

    bounds: tuple[float, ...]
    base: list[int] = field(default_factory=list)
    base_sum: float = 0.0
    pid: int | None = None
    last: HistogramSnapshot | None = None

    def update(self, pid: int | None, snapshot: HistogramSnapshot) -> None:
        if snapshot.bounds != self.bounds:
            return  # another build of the worker: do not mix buckets
        last = self.last
        if last is not None and (pid != self.pid or snapshot.count < last.count):
            self.base = [a + b for a, b in zip(self.base or [0] * len(last.counts), last.counts)]
            self.base_sum += last.sum
        self.pid, self.last = pid, snapshot

    def totals(self) -> tuple[list[int], float]:
        counts = list(self.last.counts) if self.last else [0] * (len(self.bounds) + 1)
        if self.base:
            counts = [a + b for a, b in zip(self.base, counts)]
        return counts, self.base_sum + (self.last.sum if self.last else 0.0)


def process_usage(pid: int) -> tuple[float, float] | None:
    """(resident bytes, CPU seconds user+system) of a live process, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/statm", "rb") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)
    return resident_pages * os.sysconf("SC_PAGE_SIZE"), cpu


class PipelineMetrics:
    """What the supervisor knows, as Prometheus metric families (a prometheus_client custom collector)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: dict[str, int] = {}
        self.identities = {"known": 0, "unknown": 0}
        self.publish_dropped = 0
        self.restarts: dict[str, int] = {}
        self._streams: dict[str, dict[str, Any]] = {}
        self._stream_totals: dict[tuple[str, str], _Cumulative] = {}
        self._counters: dict[tuple[str, str], _Cumulative] = {}  # (worker, name) -> total
        self._queues: dict[str, float] = {}
        self._histograms: dict[tuple[str, str], _HistogramTotal] = {}
        self._processes: dict[str, int] = {}  # process name -> current pid
        self._cpu: dict[str, _Cumulative] = {}
        self.inference_up: bool | None = None
        self.sinks: Any = None  # a callable giving {sink name: {sent, dropped, failed, queued, ...}}

    # -- fed by the supervisor -------------------------------------------------------------------------

    def observe_event(self, event: Any) -> None:
        with self._lock:
            self.events[event.kind] = self.events.get(event.kind, 0) + 1
            if event.kind == "identity":
                self.identities["known" if event.name is not None else "unknown"] += 1

    def observe_stats(self, stats: Any, pid: int | None) -> None:
        """One WorkerStats from worker `stats.worker` running as `pid`."""
        with self._lock:
            worker = stats.worker
            for stream, info in stats.streams.items():
                self._streams[stream] = {"fps": info.fps, "status": info.status}
                for name in ("frames", "dropped", "reconnects"):
                    self._stream_totals.setdefault((stream, name), _Cumulative()).update(pid, getattr(info, name))
            for name, value in stats.queues.items():
                if name.endswith(("_dropped", "_expired")):  # totals, not depths
                    self._counters.setdefault((worker, name), _Cumulative()).update(pid, value)
                else:
                    self._queues[name] = value
            for name in ("faces_sent", "faces_embedded"):
                self._counters.setdefault((worker, name), _Cumulative()).update(pid, getattr(stats, name))
            for name, snapshot in (getattr(stats, "histograms", None) or {}).items():
                total = self._histograms.get((worker, name))
                if total is None:
                    total = self._histograms[(worker, name)] = _HistogramTotal(snapshot.bounds)
                total.update(pid, snapshot)
            if stats.inference != "starting":  # a gauge from the first answer (or failure) on
                self.inference_up = stats.inference == "up"

    def set_processes(self, pids: dict[str, int | None]) -> None:
        with self._lock:
            self._processes = {name: pid for name, pid in pids.items() if pid is not None}

    # -- read by prometheus_client ---------------------------------------------------------------------

    def describe(self) -> Iterable[Any]:
        return []  # families are built at collect time; an empty describe avoids collecting at register

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            events = CounterMetricFamily("streamer_events_published", "Events published, by kind", labels=["kind"])
            for kind, n in sorted(self.events.items()):
                events.add_metric([kind], n)
            yield events
            identities = CounterMetricFamily(
                "streamer_identities", "Identity events by result (never by name)", labels=["result"]
            )
            for result, n in self.identities.items():
                identities.add_metric([result], n)
            yield identities
            yield CounterMetricFamily(
                "streamer_publish_dropped", "Events ZeroMQ could not queue for a slow subscriber",
                value=self.publish_dropped,
            )  # fmt: skip
            restarts = CounterMetricFamily("streamer_worker_restarts", "Worker restarts", labels=["worker"])
            for worker, n in sorted(self.restarts.items()):
                restarts.add_metric([worker], n)
            yield restarts

            help_text = {
                "frames": "Frames read from the source",
                "dropped": "Frames dropped (live sources skip frames to stay real time)",
                "reconnects": "Times the source reconnected",
            }
            for name, text in help_text.items():
                family = CounterMetricFamily(f"streamer_stream_{name}", text, labels=["stream"])
                for (stream, key), total in sorted(self._stream_totals.items()):
                    if key == name:
                        family.add_metric([stream], total.total)
                yield family
            fps = GaugeMetricFamily("streamer_stream_fps", "Frames per second read, recent", labels=["stream"])
            status = GaugeMetricFamily(
                "streamer_stream_status", "1 for the stream's current status", labels=["stream", "status"]
            )
            for stream, info in sorted(self._streams.items()):
                fps.add_metric([stream], info["fps"])
                for value in STREAM_STATUSES:
                    status.add_metric([stream, value], 1.0 if info["status"] == value else 0.0)
            yield fps
            yield status

            queues = GaugeMetricFamily("streamer_queue_depth", "Items waiting, by queue", labels=["queue"])
            for name, depth in sorted(self._queues.items()):
                queues.add_metric([name], depth)
            yield queues
            counters = {
                "inference_dropped": ("streamer_inference_requests_dropped", "Inference requests not sent (link full)"),
                "inference_expired": ("streamer_inference_requests_expired", "Inference requests never answered"),
                "faces_sent": ("streamer_faces_sent", "Face chips sent for inference"),
                "faces_embedded": ("streamer_faces_embedded", "Face chips whose inference results came back"),
            }
            for key, (metric, text) in counters.items():
                family = CounterMetricFamily(metric, text)
                family.add_metric([], sum(t.total for (_, name), t in self._counters.items() if name == key))
                yield family
            if self.inference_up is not None:
                yield GaugeMetricFamily("streamer_inference_up", "1 while inference answers", value=float(self.inference_up))

            histogram_help = {
                "detect_seconds": ("streamer_detection_seconds", "Face detection time per frame"),
                "inference_seconds": ("streamer_inference_latency_seconds", "Inference request round trip"),
                "batch_faces": ("streamer_inference_batch_faces", "Faces per inference batch run"),
                "batch_seconds": ("streamer_inference_batch_seconds", "Model time per inference batch"),
            }
            for (worker, name), total in sorted(self._histograms.items()):
                metric, text = histogram_help.get(name, (f"streamer_{name}", name))
                counts, total_sum = total.totals()
                buckets, running = [], 0
                for bound, n in zip([*total.bounds, math.inf], counts):
                    running += n
                    buckets.append(("+Inf" if bound == math.inf else _bound(bound), running))
                family = HistogramMetricFamily(metric, text)
                family.add_metric([], buckets, sum_value=total_sum)
                yield family

            if self.sinks is not None:
                yield from _sink_families(self.sinks())

            rss = GaugeMetricFamily(
                "streamer_process_resident_memory_bytes", "Resident memory per process", labels=["process"]
            )
            cpu = CounterMetricFamily("streamer_process_cpu_seconds", "CPU time per process", labels=["process"])
            for name, pid in sorted(self._processes.items()):
                usage = process_usage(pid)
                if usage is None:
                    continue
                rss.add_metric([name], usage[0])
                total = self._cpu.setdefault(name, _Cumulative())
                total.update(pid, usage[1])
                cpu.add_metric([name], total.total)
            yield rss
            yield cpu


def _sink_families(stats: dict[str, dict[str, int]]) -> Iterator[Any]:
    """MQTT and webhooks: what each delivered, dropped (queue full while the far end was away) and failed."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    help_text = {
        "sent": "Events a sink delivered",
        "dropped": "Events a sink dropped: its queue was full while the far end was unreachable",
        "failed": "Events a sink gave up on after its retries",
    }
    for key, text in help_text.items():
        family = CounterMetricFamily(f"streamer_sink_{key}", text, labels=["sink"])
        for sink, values in sorted(stats.items()):
            family.add_metric([sink], values.get(key, 0))
        yield family
    queued = GaugeMetricFamily("streamer_sink_queue_depth", "Events waiting in a sink's queue", labels=["sink"])
    for sink, values in sorted(stats.items()):
        queued.add_metric([sink], values.get("queued", 0))
    yield queued


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("metrics: " + format, *args)


def _with_token(app: Any, token: str | None) -> Any:
    """The exporter app behind `Authorization: Bearer <token>` (constant-time compare) when a token is set."""
    if token is None:
        return app
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"metrics: missing or wrong bearer token\n"]
        return app(environ, start_response)

    return guarded


class MetricsServer:
    """Serves `metrics` on host:port in a daemon thread; `close()` stops it and frees the port."""

    def __init__(self, metrics: PipelineMetrics, host: str, port: int, token: str | None = None) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        registry = CollectorRegistry(auto_describe=False)
        registry.register(metrics)
        app = _with_token(make_wsgi_app(registry), token)
        try:
            self._server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            from streamer.errors import ConfigError

            raise ConfigError(
                f"metrics.bind: cannot listen on {host}:{port} ({exc.strerror or exc}); choose a free port"
            ) from None
        self.host, self.port = host, int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
