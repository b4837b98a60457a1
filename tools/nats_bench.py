"""How fast events go through the NATS JetStream sink, and how long each waits for its PubAck.

    .venv/bin/python tools/nats_bench.py                         # a throwaway 3-node cluster, R3 and R1
    .venv/bin/python tools/nats_bench.py --nodes 1 --replicas 1  # one server
    .venv/bin/python tools/nats_bench.py --servers nats://HOST:4222 --token ...   # an existing cluster

Two passes per replica count, through `NatsSink` exactly as `streamer run` uses it (its queue, its thread,
its asyncio loop, max_in_flight publishes waiting for acks), with identity events of the real payload size:

- burst: N events enqueued at once (the queue holds them all); events/s = N over first enqueue to last ack.
  The latency of a burst is mostly time spent queued, so it is reported but not the figure to quote.
- paced: events enqueued at --rate per second (far above what cameras produce, below the burst rate);
  latency = PubAck arrival minus enqueue (`Sinks.publish` -> JetStream stored and replicated), p50/p95/p99.

The caller's cost per publish (what the supervisor thread pays) is reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nats_cluster import NatsCluster

from streamer.config import NatsSettings
from streamer.publish.events import Identity
from streamer.publish.nats import NatsSink

BOX = (10.0, 10.0, 60.0, 60.0)


def identities(first: int, n: int) -> list[Identity]:
    return [Identity(seq=i, stream="cam0", frame=i, pts=i / 30, track=i, box=BOX, name="Ada Lovelace", score=0.9,
                     distance=0.3, votes={"Ada Lovelace": 2}) for i in range(first, first + n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Pass:
    def __init__(self, settings: NatsSettings) -> None:
        self.enqueued: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self.lock = threading.Lock()
        self.sink = NatsSink(settings, on_ack=self._on_ack)
        deadline = time.monotonic() + 20
        while not self.sink._ready() and time.monotonic() < deadline:  # connected, stream made
            time.sleep(0.01)
        if not self.sink._ready():
            raise SystemExit(f"no JetStream at {settings.servers} within 20 s")

    def _on_ack(self, event, at: float) -> None:
        with self.lock:
            self.acked[event.seq] = at

    def publish(self, event) -> float:
        begin = time.perf_counter()
        self.enqueued[event.seq] = begin
        self.sink.publish(event)
        return time.perf_counter() - begin

    def wait(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n and time.monotonic() < deadline:
            time.sleep(0.002)

    def latencies_ms(self) -> list[float]:
        return [(self.acked[s] - self.enqueued[s]) * 1000 for s in self.acked]

    def close(self) -> dict:
        stats = self.sink.stats()
        self.sink.close()
        return stats


def burst(settings: NatsSettings, n: int) -> dict:
    run = Pass(settings)
    batch = identities(1, n)
    costs = [run.publish(event) for event in batch]
    run.wait(n)
    elapsed = max(run.acked.values()) - min(run.enqueued.values())
    lat = run.latencies_ms()
    stats = run.close()
    return {"events": n, "acked": len(run.acked), "events_per_s": round(len(run.acked) / elapsed),
            "enqueue_us_median": round(statistics.median(costs) * 1e6, 1),
            "latency_ms_p50": round(percentile(lat, 0.5), 1), "latency_ms_p95": round(percentile(lat, 0.95), 1),
            "sink": stats}


def paced(settings: NatsSettings, n: int, rate: float) -> dict:
    run = Pass(settings)
    batch = identities(1, n)
    start = time.perf_counter()
    for index, event in enumerate(batch):
        due = start + index / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(0.001, due - now))
        run.publish(event)
    run.wait(n)
    elapsed = max(run.acked.values()) - start
    lat = run.latencies_ms()
    stats = run.close()
    return {"events": n, "rate": rate, "acked": len(run.acked), "events_per_s": round(len(run.acked) / elapsed),
            "latency_ms_p50": round(percentile(lat, 0.5), 2), "latency_ms_p95": round(percentile(lat, 0.95), 2),
            "latency_ms_p99": round(percentile(lat, 0.99), 2), "sink": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events in the burst pass (default 20000)")
    parser.add_argument("--paced-events", type=int, default=5_000, help="events in the paced pass (default 5000)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s of the paced pass (default 1000)")
    parser.add_argument("--nodes", type=int, default=3, help="servers of the throwaway cluster (default 3)")
    parser.add_argument("--replicas", type=int, action="append", help="stream replicas; repeatable (default 3, 1)")
    parser.add_argument("--in-flight", type=int, default=NatsSettings.model_fields["max_in_flight"].default,
                        help="publish.nats.max_in_flight")
    parser.add_argument("--servers", nargs="+", help="an existing cluster instead of a throwaway one")
    parser.add_argument("--token", help="its token, when it needs one")
    args = parser.parse_args()
    replicas = args.replicas or ([3, 1] if args.nodes >= 3 or args.servers else [1])
    cluster = None
    if args.servers:
        servers = args.servers
    else:
        cluster = NatsCluster(Path(tempfile.mkdtemp(prefix="nats-bench-")), nodes=args.nodes)
        servers = cluster.urls
    results = []
    try:
        for r in replicas:
            common = {"servers": servers, "replicas": r, "max_in_flight": args.in_flight, "max_bytes": 1 << 30,
                      "queue": max(args.events, args.paced_events), "token": args.token}
            b = burst(NatsSettings(stream=f"BENCH_R{r}_BURST", subject_prefix=f"bench{r}b", **common), args.events)
            p = paced(NatsSettings(stream=f"BENCH_R{r}_PACED", subject_prefix=f"bench{r}p", **common),
                      args.paced_events, args.rate)
            results.append({"replicas": r, "burst": b, "paced": p})
            print(f"R{r}: burst {b['events_per_s']} events/s ({b['acked']}/{b['events']} acked, enqueue "
                  f"{b['enqueue_us_median']} us); paced {args.rate:g}/s: PubAck latency p50 {p['latency_ms_p50']} ms, "
                  f"p95 {p['latency_ms_p95']} ms, p99 {p['latency_ms_p99']} ms", flush=True)
    finally:
        if cluster is not None:
            cluster.close()
    print(json.dumps({"servers": len(servers), "in_flight": args.in_flight, "results": results}, indent=1))


if __name__ == "__main__":
    main()
