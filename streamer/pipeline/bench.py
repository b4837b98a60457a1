"""`streamer bench`: one clip, three ways, one process tree.

- decode:   PyAV decode to BGR only (the ceiling).
- pipeline: the real thing (`streamer run` on the clip: two workers, tracking, gated batched inference,
            events published on a real socket), every frame processed.
- naive:    what DeepFace `stream` and InsightFace `FaceAnalysis.get` do: one thread; on every frame
            detect, then align, embed and run every attribute head on every face, one face at a time.
            Same models and detector settings as the pipeline.
- latency:  the clip replayed as a live source at its own frame rate (a camera), measuring from a
            frame's decode to the publication of each event about it.
"""

from __future__ import annotations

import time
from typing import Any

import av
import numpy as np

from streamer.config import Settings
from streamer.errors import InputError


def decode_frames(path: str, max_frames: int | None = None) -> tuple[int, float]:
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"{path}: cannot open video ({exc})") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = 0
        started = time.perf_counter()
        for frame in container.decode(stream):
            frame.to_ndarray(format="bgr24")
            frames += 1
            if max_frames and frames >= max_frames:
                break
        return frames, time.perf_counter() - started


def naive_loop(settings: Settings, path: str, max_frames: int | None) -> tuple[int, float, int]:
    from streamer.engine import FaceEngine

    engine = FaceEngine(settings)
    detector, embedder = engine.detector, engine.embedder
    heads = {name: engine.head(name) for name in settings.attributes.enabled}
    # Load everything before the clock starts, as a long-running naive loop would have.
    warm = np.zeros((720, 1280, 3), np.uint8)
    detector.detect(warm)
    faces_done = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = 0
        started = time.perf_counter()
        for frame in container.decode(stream):
            image = frame.to_ndarray(format="bgr24")
            faces = detector.detect(image)
            for i in range(len(faces)):
                face = faces[i]
                embedder.embed(embedder.spec.prepare(image, face))
                for head in heads.values():
                    head.predict(head.prepare(image, face))
                faces_done += 1
            frames += 1
            if max_frames and frames >= max_frames:
                break
        elapsed = time.perf_counter() - started
    engine.close()
    return frames, elapsed, faces_done


def pipeline_run(settings: Settings, path: str, *, live: bool) -> dict[str, Any]:
    from streamer.pipeline.run import Supervisor

    source: dict[str, Any] = {"url": path, "id": "bench", "live": live}
    run_settings = Settings(
        **{
            **settings.model_dump(mode="json"),
            "sources": [source],
            "publish": {**settings.publish.model_dump(mode="json"), "endpoint": "tcp://127.0.0.1:*"},
            "output": {"path": None},
        }
    )
    # A clip played as a camera reconnects at its end like a camera would; one pass is enough here.
    supervisor = Supervisor(run_settings, progress=False, stop_on_status=frozenset({"lost"}) if live else frozenset())
    summary = supervisor.run()
    stats = summary.last_stats
    stream = stats.get("streams", {}).get("bench", {})
    first, last = stats.get("first_frame_at"), stats.get("last_frame_at")
    seconds = (last - first) if first is not None and last is not None and last > first else summary.seconds
    latencies = np.asarray(summary.latencies_ms, np.float64)
    return {
        "frames": int(stream.get("frames", summary.frames)),
        "seconds": seconds,
        "faces_embedded": int(summary.faces_sent),
        "events": summary.published,
        "dropped": int(stream.get("dropped", 0)),
        "latency_p50": float(np.percentile(latencies, 50)) if latencies.size else None,
        "latency_p95": float(np.percentile(latencies, 95)) if latencies.size else None,
        "latency_p95_by_kind": {
            kind: round(float(np.percentile(values, 95)), 1) for kind, values in summary.latencies_by_kind.items()
        },
    }


def run_bench(settings: Settings, path: str, max_frames: int | None = None, live: bool = True) -> dict[str, Any]:
    decoded, decode_s = decode_frames(path, max_frames)
    if decoded == 0:
        raise InputError(f"{path}: no video frames")
    pipeline = pipeline_run(settings, path, live=False)
    naive_frames, naive_s, naive_faces = naive_loop(settings, path, max_frames)
    result: dict[str, Any] = {
        "source": path,
        "frames": pipeline["frames"],
        "decode_fps": round(decoded / decode_s, 1),
        "pipeline_fps": round(pipeline["frames"] / pipeline["seconds"], 1),
        "naive_fps": round(naive_frames / naive_s, 2),
        "faces_embedded": pipeline["faces_embedded"],
        "naive_faces_embedded": naive_faces,
        "events": pipeline["events"],
    }
    result["speedup"] = round(result["pipeline_fps"] / result["naive_fps"], 1)
    if live:
        live_run = pipeline_run(settings, path, live=True)
        result["latency_ms_p50"] = _round(live_run["latency_p50"])
        result["latency_ms_p95"] = _round(live_run["latency_p95"])
        result["live_frames"] = live_run["frames"]
        result["live_dropped"] = live_run["dropped"]
        result["latency_ms_p95_by_kind"] = live_run["latency_p95_by_kind"]
    else:
        result["latency_ms_p50"] = _round(pipeline["latency_p50"])
        result["latency_ms_p95"] = _round(pipeline["latency_p95"])
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
