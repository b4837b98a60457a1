"""Prometheus metrics: worker histograms as validated values, totals that survive restarts, the exporter."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from streamer.pipeline.messages import StreamStats, WorkerStats
from streamer.pipeline.metrics import (
    DETECT_SECONDS,
    Buckets,
    HistogramSnapshot,
    MetricsServer,
    PipelineMetrics,
    process_usage,
)
from streamer.publish.events import Identity


def scrape(metrics: PipelineMetrics) -> dict[str, float]:
    """Every sample as 'name{label="v",...}' -> value, as a scraper would parse it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def stats(frames: int, *, histogram: Buckets | None = None, dropped: int = 0) -> WorkerStats:
    return WorkerStats(
        worker="detect",
        streams={"cam0": StreamStats(fps=25.0, frames=frames, dropped=dropped, status="connected", reconnects=0)},
        queues={"inference_pending": 3, "inference_expired": 2},
        histograms={} if histogram is None else {"detect_seconds": histogram.snapshot()},
    )


def test_buckets_follow_prometheus_le_semantics() -> None:
    buckets = Buckets((0.01, 0.1))
    for value in (0.005, 0.01, 0.05, 0.5, float("nan"), -1.0):
        buckets.observe(value)
    snap = buckets.snapshot()
    assert snap.counts == (2, 1, 1)  # 0.01 is "le 0.01"; NaN and negatives are ignored
    assert snap.sum == pytest.approx(0.565)
    with pytest.raises(ValueError):
        Buckets((0.1, 0.01))


def test_a_malformed_snapshot_is_rejected_on_receipt() -> None:
    with pytest.raises(ValidationError):
        HistogramSnapshot(bounds=(1.0, 2.0), counts=(1, 2), sum=3.0)  # one count short
    with pytest.raises(ValidationError):
        HistogramSnapshot(bounds=(2.0, 1.0), counts=(1, 2, 3), sum=3.0)
    with pytest.raises(ValidationError):
        HistogramSnapshot(bounds=tuple(float(i) for i in range(100)), counts=(0,) * 101, sum=0.0)


def test_counters_and_histograms_survive_a_worker_restart() -> None:
    metrics = PipelineMetrics()
    first = Buckets(DETECT_SECONDS)
    for _ in range(10):
        first.observe(0.004)
    metrics.observe_stats(stats(100, histogram=first, dropped=4), pid=1000)
    second = Buckets(DETECT_SECONDS)  # the restarted worker counts from 0 again
    for _ in range(5):
        second.observe(0.2)
    metrics.observe_stats(stats(30, histogram=second, dropped=1), pid=1001)
    samples = scrape(metrics)
    assert samples['streamer_stream_frames_total{stream="cam0"}'] == 130
    assert samples['streamer_stream_dropped_total{stream="cam0"}'] == 5
    assert samples["streamer_detection_seconds_count{}"] == 15
    assert samples['streamer_detection_seconds_bucket{le="0.005"}'] == 10
    assert samples['streamer_detection_seconds_bucket{le="+Inf"}'] == 15
    assert samples["streamer_detection_seconds_sum{}"] == pytest.approx(10 * 0.004 + 5 * 0.2)
    assert samples['streamer_queue_depth{queue="inference_pending"}'] == 3
    assert samples["streamer_inference_requests_expired_total{}"] == 4  # 2 + 2 over both processes
    assert samples['streamer_stream_status{status="connected",stream="cam0"}'] == 1
    assert samples['streamer_stream_status{status="lost",stream="cam0"}'] == 0


def test_identities_are_counted_known_or_unknown_never_by_name() -> None:
    metrics = PipelineMetrics()
    face = dict(stream="cam0", frame=1, pts=0.0, track=1, box=(0, 0, 10, 10), distance=0.3, score=0.7, votes={})
    metrics.observe_event(Identity(name="Lin-Manuel Miranda", **face))
    metrics.observe_event(Identity(name=None, **face))
    text = generate_latest(_registry(metrics)).decode()
    assert "Lin-Manuel" not in text
    samples = scrape(metrics)
    assert samples['streamer_identities_total{result="known"}'] == 1
    assert samples['streamer_identities_total{result="unknown"}'] == 1
    assert samples['streamer_events_published_total{kind="identity"}'] == 2


def test_process_usage_reads_rss_and_cpu_of_live_processes_only() -> None:
    rss, cpu = process_usage(os.getpid())
    assert rss > 10 * 1024 * 1024 and cpu > 0
    metrics = PipelineMetrics()
    metrics.set_processes({"supervisor": os.getpid(), "detect": 2**22 + 12345})  # the second pid is not alive
    samples = scrape(metrics)
    assert samples['streamer_process_resident_memory_bytes{process="supervisor"}'] == pytest.approx(rss, rel=0.5)
    assert not any('process="detect"' in key for key in samples)


def _registry(metrics: PipelineMetrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_exporter_serves_and_refuses_a_missing_or_wrong_token() -> None:
    metrics = PipelineMetrics()
    metrics.observe_stats(stats(7), pid=1)
    server = MetricsServer(metrics, "127.0.0.1", 0, token="s3cret")
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert _get(url)[0] == 401
        assert _get(url, "wrong")[0] == 401
        code, body = _get(url, "s3cret")
        assert code == 200 and 'streamer_stream_frames_total{stream="cam0"} 7.0' in body
    finally:
        server.close()
    with socket.socket() as probe:  # nothing listens there any more (TIME_WAIT leftovers aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))


def test_a_busy_port_is_one_clear_error() -> None:
    from streamer.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="metrics.bind"):
            MetricsServer(PipelineMetrics(), "127.0.0.1", busy.getsockname()[1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scrape_url(url: str) -> dict[str, float] | None:
    try:
        code, body = _get(url)
    except OSError:
        return None
    if code != 200:
        return None
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_a_real_run_moves_counters_and_fills_histograms(tmp_path, media_dir):
    """Scrape `streamer run` twice while it works on the sample clip (a live, looped file)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    gallery = tmp_path / "people.db"
    subprocess.run([sys.executable, "-m", "streamer", "gallery", "add", "Eileen Collins",
                    repo / "sample_videos/astronaut.jpg", "--gallery", gallery], check=True, env=env,
                   capture_output=True)  # fmt: skip
    port = _free_port()
    config = tmp_path / "run.yaml"
    config.write_text(
        f"sources: [{{url: {repo / 'sample_videos/astronaut.mp4'}, live: true, loop: true, id: lobby}}]\n"
        f"publish: {{endpoint: tcp://127.0.0.1:{_free_port()}}}\n"
        f"metrics: {{bind: '127.0.0.1:{port}'}}\n"
    )
    run = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", config, "--gallery", gallery,
                            "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        first = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and run.poll() is None:
            samples = _scrape_url(url)
            if (samples and samples.get('streamer_identities_total{result="known"}', 0) >= 1
                    and samples.get('streamer_stream_frames_total{stream="lobby"}', 0) > 0):
                if first is None:
                    first = samples
                    time.sleep(2)
                    continue
                second = samples
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no identity in the metrics: {run.stderr.read() if run.poll() is not None else 'timeout'}")
        frames = 'streamer_stream_frames_total{stream="lobby"}'
        assert second[frames] > first[frames] > 0
        assert second["streamer_detection_seconds_count{}"] > first["streamer_detection_seconds_count{}"]
        assert second["streamer_inference_latency_seconds_count{}"] >= 1
        assert second["streamer_inference_batch_faces_count{}"] >= 1
        assert second['streamer_events_published_total{kind="identity"}'] >= 1
        assert second['streamer_stream_status{status="connected",stream="lobby"}'] == 1
        assert second["streamer_stream_fps{stream=\"lobby\"}"] > 0
        for process in ("supervisor", "detect", "inference"):
            assert second[f'streamer_process_resident_memory_bytes{{process="{process}"}}'] > 20e6
            assert second[f'streamer_process_cpu_seconds_total{{process="{process}"}}'] > 0
        assert second["streamer_inference_up{}"] == 1
    finally:
        run.terminate()
        run.wait(timeout=60)
