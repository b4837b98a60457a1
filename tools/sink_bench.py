"""How fast the MQTT and webhook sinks go, and what they cost the pipeline.

    .venv/bin/python tools/sink_bench.py                      # micro-bench: N events into each sink
    .venv/bin/python tools/sink_bench.py --run CLIP --gallery people.db   # + identity ZeroMQ -> MQTT delay,
                                                              #   and the clip's fps with and without sinks

Micro-bench: a local Mosquitto (tests/mosquitto.py) and a local keep-alive HTTP server. For each sink it
reports the caller's cost per publish (what the supervisor thread pays) and the sustained delivery rate
(first publish to last message received; queues sized so nothing is dropped).
With --run: `streamer run` over the clip (live, paced) with MQTT on, a ZeroMQ subscriber and an MQTT
subscriber side by side; the delay is the MQTT arrival minus the ZeroMQ arrival of the same identity
(matched by seq). Then the clip as a file run (every frame, as fast as it goes), alternating without and
with both sinks, `--repeat` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from mosquitto import Collector, Mosquitto  # noqa: E402

from streamer.config import MqttSettings, WebhookSettings  # noqa: E402
from streamer.publish.events import Identity, TrackStarted  # noqa: E402

BOX = (10.0, 10.0, 60.0, 60.0)


def events(n: int, kind: str) -> list:
    if kind == "identity":
        return [Identity(seq=i, stream="cam0", frame=i, pts=i / 30, track=i, box=BOX, name="Ada", score=0.9,
                         distance=0.3, votes={"Ada": 2}) for i in range(1, n + 1)]
    return [TrackStarted(seq=i, stream="cam0", frame=i, pts=i / 30, track=i, box=BOX) for i in range(1, n + 1)]


def bench_mqtt(broker: Mosquitto, n: int, kind: str) -> dict:
    from streamer.publish.mqtt import MqttSink

    batch = events(n, kind)
    collector = Collector(broker.port, [f"bench/cam0/{kind}"])
    sink = MqttSink(MqttSettings(url=broker.url, topic_prefix="bench", discovery=False, queue=n), streams=["cam0"])
    deadline = time.monotonic() + 10
    while not sink.stats()["connected"] and time.monotonic() < deadline:
        time.sleep(0.01)
    begin = time.perf_counter()
    for event in batch:
        sink.publish(event)
    publish_s = time.perf_counter() - begin
    last = f'"seq":{n},'.encode()
    collector.wait_for(lambda m: last in m.payload, 120, "the last event")
    total_s = time.perf_counter() - begin
    stats = sink.stats()
    sink.close()
    collector.close()
    got = len(collector.messages)
    return {"sink": f"mqtt qos{1 if kind == 'identity' else 0} ({kind})", "events": n, "received": got,
            "publish_us": round(publish_s / n * 1e6, 2), "delivered_per_s": round(got / total_s),
            "dropped": stats["dropped"], "failed": stats["failed"]}


class _Server:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real webhook receivers do

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.count += 1
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"


def bench_webhook(n: int) -> dict:
    from streamer.publish.webhooks import WebhookSink

    server = _Server()
    sink = WebhookSink(WebhookSettings(url=server.url, queue=n))
    batch = events(n, "identity")
    begin = time.perf_counter()
    for event in batch:
        sink.publish(event)
    publish_s = time.perf_counter() - begin
    while server.count < n and time.perf_counter() - begin < 300:
        time.sleep(0.005)
    total_s = time.perf_counter() - begin
    stats = sink.stats()
    sink.close()
    server.httpd.shutdown()
    return {"sink": "webhook (identity)", "events": n, "received": server.count,
            "publish_us": round(publish_s / n * 1e6, 2), "delivered_per_s": round(server.count / total_s),
            "dropped": stats["dropped"], "failed": stats["failed"]}


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.setdefault("STREAMER_MODEL_DIR", str(REPO.parent / "shared" / "models"))
    return env


def _endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def identity_delay(clip: Path, gallery: Path, broker: Mosquitto, folder: Path, seconds: float) -> dict:
    """ZeroMQ arrival -> MQTT arrival of the same identity event, in a real paced run."""
    from streamer.publish.subscriber import EventSubscriber

    config = folder / "delay.yaml"
    config.write_text(f"sources:\n  - url: {clip}\n    live: true\n    loop: true\n"
                      f"publish:\n  mqtt:\n    url: {broker.url}\n")
    endpoint = _endpoint()
    subscriber = EventSubscriber(endpoint, topics=["identity."], timeout_ms=50)
    collector = Collector(broker.port, ["streamer/+/identity"])
    zmq_at: dict[int, float] = {}
    process = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config), "--gallery",
                                str(gallery), "--publish", endpoint, "-q"], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            message = subscriber.receive_message(50)
            if message is not None:
                zmq_at[message.event.seq] = time.monotonic()
    finally:
        process.terminate()
        process.wait(60)
        subscriber.close()
        collector.close()
    delays = [(m.at - zmq_at[seq]) * 1000 for m in collector.messages
              if (seq := json.loads(m.payload)["seq"]) in zmq_at]
    if not delays:
        return {"identities": 0}
    delays.sort()
    return {"identities": len(delays), "median_ms": round(statistics.median(delays), 2),
            "p95_ms": round(delays[int(0.95 * (len(delays) - 1))], 2), "max_ms": round(delays[-1], 2)}


def pipeline_fps(clip: Path, gallery: Path, broker: Mosquitto, folder: Path, repeat: int) -> dict:
    """The clip as a file run (every frame, no pacing), alternating without and with both sinks."""
    server = _Server()
    with_sinks = folder / "with.yaml"
    with_sinks.write_text(f"sources:\n  - url: {clip}\npublish:\n  mqtt:\n    url: {broker.url}\n"
                          f"  webhooks:\n    - url: {server.url}\n      kinds: [identity, track.started, "
                          "track.updated, track.ended, attributes, stream.status, heartbeat]\n")
    without = folder / "without.yaml"
    without.write_text(f"sources:\n  - url: {clip}\n")
    results: dict[str, list[float]] = {"without sinks": [], "with mqtt + webhook": []}
    for _ in range(repeat):
        for label, config in (("without sinks", without), ("with mqtt + webhook", with_sinks)):
            out = subprocess.run([sys.executable, "-m", "streamer", "run", "--config", str(config), "--gallery",
                                  str(gallery), "--publish", _endpoint(), "-q"], env=_env(), capture_output=True,
                                 text=True, timeout=600)
            match = re.search(r"(\d+) frames in ([\d.]+) s", out.stderr)
            if out.returncode != 0 or not match:
                raise SystemExit(f"streamer run failed: {out.stderr[-2000:]}")
            results[label].append(int(match.group(1)) / float(match.group(2)))
    server.httpd.shutdown()
    return {label: {"fps_median": round(statistics.median(v), 2), "runs": [round(x, 2) for x in v]}
            for label, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per MQTT pass (default 20000)")
    parser.add_argument("--webhook-events", type=int, default=3_000, help="events for the webhook (default 3000)")
    parser.add_argument("--run", type=Path, metavar="CLIP", help="also measure a real run over this clip")
    parser.add_argument("--gallery", type=Path, help="gallery for --run")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the paced delay run")
    parser.add_argument("--repeat", type=int, default=2, help="file runs per configuration for the fps comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sink-bench-") as folder, Mosquitto(
            Path(folder) / "broker", extra=("max_queued_messages 0",)  # the bench's subscriber lags: keep all
    ) as broker:
        report: dict = {"sinks": [bench_mqtt(broker, args.events, "track.started"),
                                  bench_mqtt(broker, args.events, "identity"),
                                  bench_webhook(args.webhook_events)]}
        if args.run:
            if args.gallery is None:
                raise SystemExit("--run needs --gallery")
            report["identity_zeromq_to_mqtt"] = identity_delay(args.run, args.gallery, broker, Path(folder),
                                                               args.seconds)
            report["pipeline"] = pipeline_fps(args.run, args.gallery, broker, Path(folder), args.repeat)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
