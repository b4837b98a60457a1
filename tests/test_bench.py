"""`streamer bench` and the `max_frames` source setting it relies on: real clip, real models, real workers.

One bench run (every pass, 40 frames of the sample clip) is shared by the tests below; it takes about
20 s on a 2-core machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from streamer.config import ReconnectSettings, SourceSettings
from streamer.sources import open_source

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_videos" / "astronaut.mp4"  # 240 frames, 30 fps, one face
FRAMES = 40
PASSES = ("decode", "pipeline", "serial_tracked", "per_frame_all_models", "live")


def drain(source, within: float = 10.0) -> tuple[list, list[str]]:
    """Every frame until the source is finished, and the statuses it reported on the way."""
    frames, statuses = [], []
    deadline = time.monotonic() + within
    while not source.finished and time.monotonic() < deadline:
        frame = source.read(0.1)
        if frame is not None:
            frames.append(frame)
        statuses += [change.status for change in source.poll_status()]
    statuses += [change.status for change in source.poll_status()]
    return frames, statuses


# -- max_frames ---------------------------------------------------------------------------------------------
def test_file_source_stops_at_max_frames():
    source = open_source(SourceSettings(url=str(SAMPLE), max_frames=7), "cam0", ReconnectSettings())
    assert source.total_frames is None  # known once open
    with source:
        assert source.total_frames == 7
        frames, statuses = drain(source)
    assert [f.index for f in frames] == list(range(7))
    assert statuses == ["connected", "ended"]


def test_looped_file_source_stops_at_max_frames():
    source = open_source(SourceSettings(url=str(SAMPLE), loop=True, max_frames=250), "cam0", ReconnectSettings())
    with source:
        frames, _ = drain(source, within=30)
    assert len(frames) == 250  # past the end of the 240-frame clip once, then stopped


def test_live_source_ends_at_max_frames_without_reconnecting():
    settings = SourceSettings(url=str(SAMPLE), live=True, max_frames=6)  # paced at 30 fps: 0.2 s
    with open_source(settings, "cam0", ReconnectSettings(initial_delay_s=0.1)) as source:
        frames, statuses = drain(source)
        assert source.stats.frames == 6
        assert len(frames) + source.stats.dropped == 6
    assert statuses == ["connected", "ended"]  # neither "lost" nor "reconnected"


@pytest.mark.parametrize("bad", [0, -3])
def test_max_frames_must_be_positive(bad):
    with pytest.raises(ValidationError, match="max_frames"):
        SourceSettings(url="a.mp4", max_frames=bad)


# -- the bench ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(model_dir, cache_dir) -> dict:
    """`streamer bench SAMPLE --frames 40 --json`, in this process (its workers are real processes)."""
    from streamer.cli import main

    with pytest.MonkeyPatch.context() as patch:
        captured: list[str] = []
        patch.setenv("STREAMER_MODELS__CACHE_DIR", str(cache_dir))  # the session's conversions, not ~/.cache
        patch.setattr("streamer.cli._emit", lambda obj: captured.append(json.dumps(obj)))
        code = main(["bench", str(SAMPLE), "--frames", str(FRAMES), "--json", "--model-dir", str(model_dir)])
    assert code == 0
    return json.loads(captured[0])


def test_every_pass_honours_frames(bench):
    assert bench["max_frames"] == FRAMES
    assert set(bench["passes"]) == set(PASSES)
    for name in PASSES:
        result = bench["passes"][name]
        assert result["frames"] == FRAMES, name
        assert result["seconds"] > 0 and result["fps"] == pytest.approx(FRAMES / result["seconds"], rel=0.01), name
    live = bench["passes"]["live"]
    assert live["frames_processed"] + live["frames_dropped"] == FRAMES


def test_faces_embedded_are_counted_per_pass(bench):
    passes = bench["passes"]
    assert passes["decode"]["faces_embedded"] == 0
    # one face in every frame: the per-frame loop embeds it every time ...
    assert passes["per_frame_all_models"]["faces_embedded"] == FRAMES
    # ... tracking + the gate embed it a few times per track, in one process or two alike
    serial = passes["serial_tracked"]["faces_embedded"]
    assert 0 < serial <= FRAMES // 4
    assert passes["pipeline"]["faces_embedded"] == serial
    assert passes["pipeline"]["faces_sent"] == serial


def test_ratios_are_the_fps_ratios(bench):
    fps = {name: bench["passes"][name]["fps"] for name in PASSES}
    ratios = bench["ratios"]
    assert ratios["pipeline_over_serial_tracked"] == pytest.approx(fps["pipeline"] / fps["serial_tracked"], abs=0.01)
    assert ratios["serial_tracked_over_per_frame_all_models"] == pytest.approx(
        fps["serial_tracked"] / fps["per_frame_all_models"], abs=0.01)
    assert ratios["pipeline_over_decode"] == pytest.approx(fps["pipeline"] / fps["decode"], abs=0.01)
    assert ratios["serial_tracked_over_per_frame_all_models"] > 1  # skipping most faces must pay off


def test_live_latency_is_reported_per_event_kind(bench):
    latency = bench["passes"]["live"]["latency_ms"]
    assert set(latency) == {"track", "recognition", "by_kind"}
    assert {"track.started", "identity", "attributes"} <= set(latency["by_kind"])
    for group, kinds in (("track", ("track.started", "track.updated", "track.ended")),
                         ("recognition", ("identity", "attributes"))):
        stats = latency[group]
        assert stats["events"] == sum(latency["by_kind"].get(k, {"events": 0})["events"] for k in kinds)
        assert 0 < stats["p50"] <= stats["p95"]
    assert "latency_ms_p95" not in json.dumps(bench)  # no pooled figure any more


def test_text_report_labels_the_baselines(bench):
    from streamer.pipeline.bench import format_report

    text = format_report(bench)
    assert "FaceAnalysis.get" in text and "serial, tracked + gated" in text
    assert "(batching + the second process)" in text and "(tracking + gating)" in text
    assert "identity + attributes" in text and "track events" in text


def test_text_report_without_live_pass_shows_the_file_pass_latency(bench):
    from streamer.pipeline.bench import format_report

    text = format_report({**bench, "passes": {**bench["passes"], "live": None}})
    assert "latency, file pass" in text and "live camera" not in text


def test_frames_must_be_positive(capsys):
    from streamer.cli import main

    assert main(["bench", str(SAMPLE), "--frames", "0"]) == 2
    assert "--frames" in capsys.readouterr().err


# -- --streams: many live copies per detect-worker count ----------------------------------------------------
STREAM_FRAMES = 20


@pytest.fixture(scope="module")
def streams_bench(model_dir, cache_dir) -> dict:
    """`streamer bench SAMPLE --streams 2 --workers 2 --frames 20 --json`."""
    from streamer.cli import main

    with pytest.MonkeyPatch.context() as patch:
        captured: list[str] = []
        patch.setattr("streamer.cli._emit", lambda obj: captured.append(json.dumps(obj)))
        code = main(["bench", str(SAMPLE), "--streams", "2", "--workers", "2", "--frames", str(STREAM_FRAMES),
                     "--json", "--model-dir", str(model_dir)])
    assert code == 0
    return json.loads(captured[0])


def test_streams_bench_runs_each_stream_count(streams_bench):
    assert streams_bench["clip"] == {"width": 1280, "height": 720, "fps": 30.0, "frames": 240}
    assert streams_bench["frames_per_stream"] == STREAM_FRAMES
    (entry,) = streams_bench["workers"]
    runs = entry["runs"]
    assert entry["detect_workers"] == 2 and runs[0]["streams"] == 1
    assert runs[0]["detect_workers"] == 1, "never more workers than streams"
    for run in runs:
        assert set(run["per_stream"]) == {f"bench{i}" for i in range(run["streams"])}
        for stream in run["per_stream"].values():
            assert stream["frames"] == STREAM_FRAMES == stream["processed"] + stream["dropped"]
        assert run["held"] == (run["worst_dropped_share"] < 0.01)
        assert run["frames"] == STREAM_FRAMES * run["streams"]
        assert "track.started" in run["latency_ms"]["by_kind"]
    assert [run["streams"] for run in runs] == [1, 2] and runs[1]["detect_workers"] == 2
    assert entry["held"] == max([run["streams"] for run in runs if run["held"]], default=0)


def test_streams_bench_text_report(streams_bench):
    from streamer.pipeline.bench import format_streams_report

    text = format_streams_report(streams_bench)
    assert "1280x720 at 30.0 fps" in text and "detect workers 2:" in text and "track.started" in text


@pytest.mark.parametrize("bad", ["0", "x", "1,,2", "65"])
def test_workers_must_be_counts(capsys, bad):
    from streamer.cli import main

    assert main(["bench", str(SAMPLE), "--streams", "2", "--workers", bad]) == 2
    assert "--workers" in capsys.readouterr().err
