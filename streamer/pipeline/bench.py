"""`streamer bench`: one clip, five passes, the same models, frames and clock for each.

Passes (all honour `max_frames`; all load and warm their models before the clock starts):

- decode:               PyAV decode to BGR only (converted as the sources do): the ceiling for everything else.
- pipeline:             the real thing (`streamer run` on the clip): two worker processes, tracking, the
                        inference gate, cross-stream batching, events published on a real socket; every
                        frame processed (files apply backpressure, nothing is dropped).
- serial_tracked:       the same tracker, gate, scene-cut detector and recogniser, in one process and one
                        thread: decode, track, then run the models right away on that frame's selected faces
                        (no batching across frames or streams, no second process), publish. The baseline
                        that separates what tracking + gating buy from what batching + the second process buy.
- per_frame_all_models: every model on every face on every frame, one face at a time, one thread: the
                        InsightFace `FaceAnalysis.get` pattern. (DeepFace `stream` analyses less often than
                        that, and freezes the picture meanwhile, so it is not a like-for-like loop.)
- live:                 the clip replayed as a live camera at its own frame rate, for latency: from a frame's
                        decode to the publication of each event about it, per event kind and grouped
                        (track events versus recognition results).

Every pass is timed over the same window: from the first frame read to the last result produced (or,
for the pipeline, published). `faces_embedded` counts faces whose embedding was actually computed.

`--streams K` measures something else (`streams_bench`): K copies of the clip played as live cameras at
once, for each detect-worker count asked for, one run each of 1, 2, ... K streams: how many streams hold
real time (every stream drops under 1% of its frames), and the latency per event kind at each count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import av
import numpy as np

from streamer.config import Settings
from streamer.errors import InputError
from streamer.sources.pyav import BgrConverter
from streamer.types import Frame

STREAM = "bench"
TRACK_KINDS = ("track.started", "track.updated", "track.ended")
RECOGNITION_KINDS = ("identity", "attributes")
PER_FRAME_PATTERN = "InsightFace FaceAnalysis.get: every model on every face on every frame, one thread"
WINDOW = "first frame read -> last result published (decode: last frame decoded)"
REAL_TIME_DROP = 0.01  # a live stream holds real time while it drops less than this share of its frames


def _open_video(path: str) -> tuple[Any, Any]:
    """The container of `path` and its first video stream; InputError (one line) when there is none."""
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"{path}: cannot open video ({exc})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: no video stream")
    return container, container.streams.video[0]


# -- the shared decode loop (decode, serial_tracked and per_frame_all_models) ---------------------------------
def read_frames(path: str, max_frames: int | None = None) -> Iterator[Frame]:
    """Frames of `path` decoded inline (no reader thread), `decoded_at` stamped when the BGR image exists."""
    container, stream = _open_video(path)
    with container:
        stream.thread_type = "AUTO"  # as the pipeline's source does
        to_bgr = BgrConverter()  # and converted as it does
        for index, frame in enumerate(container.decode(stream)):
            if max_frames is not None and index >= max_frames:
                return
            image = to_bgr(frame)
            pts = float(frame.time) if frame.time is not None else float(index)
            yield Frame(STREAM, index, pts, time.monotonic(), image)


def _pass(frames: int, first: float | None, last: float | None, faces_embedded: int, **extra: Any) -> dict[str, Any]:
    seconds = (last - first) if first is not None and last is not None and last > first else None
    return {
        "frames": frames,
        "seconds": _round(seconds, 3),
        "fps": _round(frames / seconds if seconds else None, 2),
        "faces_embedded": faces_embedded,
        **extra,
    }


def decode_pass(path: str, max_frames: int | None = None) -> dict[str, Any]:
    frames, first, last = 0, None, None
    for frame in read_frames(path, max_frames):
        first = first if first is not None else frame.decoded_at
        last = frame.decoded_at
        frames += 1
    return _pass(frames, first, last, 0)


# -- serial_tracked ------------------------------------------------------------------------------------------
def serial_tracked_pass(settings: Settings, path: str, max_frames: int | None = None) -> dict[str, Any]:
    """The pipeline's per-stream logic (StreamProcessor + StreamSlot + TrackRecogniser) in one thread, with
    `InferenceModels.run` called on each frame's ChipBatch as soon as the processor emits it."""
    from streamer.imaging import encode_jpeg, face_crop
    from streamer.infer.batch import InferenceModels
    from streamer.infer.chips import ChipPreparer
    from streamer.match.matcher import open_matcher
    from streamer.match.recogniser import TrackRecogniser
    from streamer.models.factory import ModelFactory
    from streamer.pipeline.slot import StreamSlot
    from streamer.publish.publisher import EventPublisher
    from streamer.track.processor import StreamProcessor

    factory = ModelFactory(settings)
    detector = factory.detector(for_tracking=True)
    detector.detect(np.zeros((720, 1280, 3), np.uint8))  # first-run setup, as the detect worker does
    spec = factory.embedder_spec
    chips = ChipPreparer(spec, settings.attributes.enabled)
    models = InferenceModels.load(factory)  # warms every session up
    gallery, matcher = open_matcher(settings.gallery, spec)
    processor = StreamProcessor.from_settings(STREAM, settings, detector, chips.prepare)
    recogniser = TrackRecogniser.from_settings(STREAM, settings, matcher)
    slot = StreamSlot(_NoSource(), processor, recogniser)  # only its processor/recogniser bookkeeping is used
    publish = settings.publish
    publisher = EventPublisher("tcp://127.0.0.1:*", publish.sndhwm, include_crops=publish.include_crops,
                               include_embeddings=publish.include_embeddings)
    first = last = None
    faces_embedded = events = 0
    try:
        for frame in read_frames(path, max_frames):
            first = first if first is not None else frame.decoded_at
            step = processor.process(frame)
            for event in slot.apply(step):
                publisher.publish(event)
                events += 1
            if step.chips is not None:
                batch = step.chips
                arrays = models.run(batch.arrays)
                faces_embedded += len(arrays.get("embedding", ()))
                crops = None
                if publish.include_crops:  # as the inference client does for the pipeline
                    crops = [encode_jpeg(face_crop(frame.image, box)) for box in batch.boxes]
                for event, crop in recogniser.on_results(batch, arrays, crops):
                    publisher.publish(event, crop=crop)
                    events += 1
        for event in slot.apply(processor.end_all("end_of_input")):  # as the pipeline ends a stream
            publisher.publish(event)
            events += 1
        last = time.monotonic()
    finally:
        publisher.close()
        detector.close()
        if gallery is not None:
            gallery.close()
    return _pass(processor.frames, first, last, faces_embedded, events_published=events)  # face events only


class _NoSource:
    """StreamSlot wants a source; this pass reads its frames itself (inline, one thread) and only uses the
    slot's bookkeeping between processor and recogniser (`apply`)."""


# -- per_frame_all_models ------------------------------------------------------------------------------------
def per_frame_all_models_pass(settings: Settings, path: str, max_frames: int | None = None) -> dict[str, Any]:
    """Detect every frame, then align, embed and run every attribute head on every face, one face and one
    model call at a time (InsightFace `FaceAnalysis.get`). Same detector settings, models and sessions as the
    pipeline (detection at the detector's own score threshold: there is no tracker to want low-score boxes)."""
    from streamer.infer.batch import InferenceModels
    from streamer.infer.chips import ChipPreparer
    from streamer.match.matcher import open_matcher
    from streamer.models.factory import ModelFactory

    factory = ModelFactory(settings)
    detector = factory.detector()
    detector.detect(np.zeros((720, 1280, 3), np.uint8))
    spec = factory.embedder_spec
    chips = ChipPreparer(spec, settings.attributes.enabled)
    models = InferenceModels.load(factory)
    gallery, matcher = open_matcher(settings.gallery, spec)
    first = last = None
    frames = faces_embedded = 0
    try:
        for frame in read_frames(path, max_frames):
            first = first if first is not None else frame.decoded_at
            faces = detector.detect(frame.image)
            for i in range(len(faces)):
                results = models.run(chips.prepare(frame.image, faces[i : i + 1]))
                if matcher is not None:
                    matcher.match(results["embedding"])
                faces_embedded += len(results.get("embedding", ()))
            frames += 1
            last = time.monotonic()
    finally:
        detector.close()
        if gallery is not None:
            gallery.close()
    return _pass(frames, first, last, faces_embedded, pattern=PER_FRAME_PATTERN)


# -- pipeline and live (the real supervisor) -----------------------------------------------------------------
def pipeline_pass(settings: Settings, path: str, max_frames: int | None = None, *, live: bool) -> dict[str, Any]:
    from streamer.pipeline.run import Supervisor

    source: dict[str, Any] = {"url": path, "id": STREAM, "live": live, "max_frames": max_frames}
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
    stream = summary.last_stats.get("streams", {}).get(STREAM, {})
    processed = int(stream.get("frames", summary.frames))
    dropped = int(stream.get("dropped", 0))
    # everything the supervisor published: face events plus stream.status and heartbeats
    extra: dict[str, Any] = {"faces_sent": int(summary.faces_sent), "events_published": summary.published}
    if live:  # a camera drops what the pipeline cannot take: frames counts what the camera produced
        extra = {"frames_processed": processed, "frames_dropped": dropped, **extra}
    extra["latency_ms"] = latency_report(summary.latencies_by_kind)
    return _pass(processed + dropped, summary.first_frame_at, summary.last_published_at,
                 int(summary.faces_embedded), **extra)


def latency_report(by_kind: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """{"track": {...}, "recognition": {...}, "by_kind": {kind: {...}}}, each {"events", "p50", "p95"}."""

    def stats(values: Sequence[float]) -> dict[str, Any]:
        array = np.asarray(values, np.float64)
        if not array.size:
            return {"events": 0, "p50": None, "p95": None}
        return {"events": int(array.size), "p50": _round(float(np.percentile(array, 50)), 1),
                "p95": _round(float(np.percentile(array, 95)), 1)}

    def grouped(kinds: Sequence[str]) -> dict[str, Any]:
        return stats([v for kind in kinds for v in by_kind.get(kind, ())])

    known = (*TRACK_KINDS, *RECOGNITION_KINDS)
    order = [kind for kind in known if kind in by_kind] + sorted(set(by_kind) - set(known))
    return {
        "track": grouped(TRACK_KINDS),
        "recognition": grouped(RECOGNITION_KINDS),
        "by_kind": {kind: stats(by_kind[kind]) for kind in order},
    }


# -- the whole bench -----------------------------------------------------------------------------------------
def run_bench(settings: Settings, path: str, max_frames: int | None = None, live: bool = True) -> dict[str, Any]:
    if max_frames is not None and max_frames < 1:
        raise InputError(f"--frames: expected a positive number of frames, got {max_frames}")
    decode = decode_pass(path, max_frames)
    if decode["frames"] == 0:
        raise InputError(f"{path}: no video frames")
    passes: dict[str, Any] = {
        "decode": decode,
        "pipeline": pipeline_pass(settings, path, max_frames, live=False),
        "serial_tracked": serial_tracked_pass(settings, path, max_frames),
        "per_frame_all_models": per_frame_all_models_pass(settings, path, max_frames),
        "live": pipeline_pass(settings, path, max_frames, live=True) if live else None,
    }
    fps = {name: (result or {}).get("fps") for name, result in passes.items()}
    return {
        "source": path,
        "max_frames": max_frames,
        "window": WINDOW,
        "passes": passes,
        "ratios": {
            # what batching across frames/streams plus the second (inference) process buy
            "pipeline_over_serial_tracked": _ratio(fps["pipeline"], fps["serial_tracked"]),
            # what tracking plus the inference gate buy
            "serial_tracked_over_per_frame_all_models": _ratio(fps["serial_tracked"], fps["per_frame_all_models"]),
            # how close the pipeline runs to decoding alone
            "pipeline_over_decode": _ratio(fps["pipeline"], fps["decode"]),
        },
    }


def format_report(result: Mapping[str, Any]) -> str:
    """The bench result as text for people."""
    passes, ratios = result["passes"], result["ratios"]
    labels = {
        "decode": "decode only (ceiling)",
        "pipeline": "pipeline (2 processes, batched)",
        "serial_tracked": "serial, tracked + gated",
        "per_frame_all_models": "per frame, all models*",
    }
    lines = [f"{result['source']}  (window: {result['window']})", ""]
    lines.append(f"{'pass':<34}{'frames':>7}{'seconds':>9}{'fps':>9}{'faces embedded':>16}")
    for name, label in labels.items():
        p = passes[name]
        lines.append(f"{label:<34}{p['frames']:>7}{_text(p['seconds']):>9}{_text(p['fps']):>9}"
                     f"{p['faces_embedded']:>16}")
    lines.append(f"  * {PER_FRAME_PATTERN}")
    lines.append("")
    lines.append(f"pipeline / serial_tracked             {_text(ratios['pipeline_over_serial_tracked'])}x"
                 "  (batching + the second process)")
    lines.append(f"serial_tracked / per_frame_all_models {_text(ratios['serial_tracked_over_per_frame_all_models'])}x"
                 "  (tracking + gating)")
    lines.append(f"pipeline / decode                     {_text(ratios['pipeline_over_decode'])}")
    live = passes.get("live")
    for name, title in (("live", "latency, clip replayed as a live camera"),
                        ("pipeline", "latency, file pass (frames queue behind inference)")):
        run = passes.get(name)
        if run is None or (name == "pipeline" and live is not None):
            continue
        lines.append("")
        extra = (f", {run['frames_processed']} processed, {run['frames_dropped']} dropped"
                 if name == "live" else "")
        lines.append(f"{title}: {run['frames']} frames{extra}")
        latency = run["latency_ms"]
        rows = [("track events", latency["track"])]
        rows += [(f"  {kind}", latency["by_kind"][kind]) for kind in TRACK_KINDS if kind in latency["by_kind"]]
        rows += [("identity + attributes", latency["recognition"])]
        rows += [(f"  {kind}", latency["by_kind"][kind]) for kind in RECOGNITION_KINDS if kind in latency["by_kind"]]
        for label, stats in rows:
            lines.append(f"  {label:<26} p50 {_text(stats['p50']):>7} ms   p95 {_text(stats['p95']):>7} ms"
                         f"   ({stats['events']} events)")
    return "\n".join(lines)


# -- many streams (--streams K) -------------------------------------------------------------------------------
def clip_info(path: str) -> dict[str, Any]:
    """Width, height, frame rate and frame count of a clip (the count decoded when the header lacks it)."""
    container, stream = _open_video(path)
    with container:
        rate = float(stream.average_rate) if stream.average_rate else None
        frames = stream.frames or sum(1 for _ in container.decode(stream))
        return {"width": stream.width, "height": stream.height, "fps": _round(rate, 3), "frames": frames}


def live_streams_pass(settings: Settings, path: str, streams: int, workers: int | str,
                      frames: int) -> dict[str, Any]:
    """`streams` copies of the clip as live cameras (each `frames` frames long) over `workers` detect
    workers: frames and drops per stream, whether every stream held real time, latency per event kind."""
    from streamer.pipeline.run import Supervisor

    sources = [{"url": path, "id": f"{STREAM}{i}", "live": True, "max_frames": frames} for i in range(streams)]
    run_settings = Settings(
        **{
            **settings.model_dump(mode="json"),
            "sources": sources,
            "publish": {**settings.publish.model_dump(mode="json"), "endpoint": "tcp://127.0.0.1:*"},
            "output": {"path": None},
            "pipeline": {"detect_workers": workers},
        }
    )
    supervisor = Supervisor(run_settings, progress=False)
    used = len(supervisor.detects)
    summary = supervisor.run()
    per_stream = {}
    for source in sources:
        info = summary.last_stats.get("streams", {}).get(source["id"], {})
        processed, dropped = int(info.get("frames", 0)), int(info.get("dropped", 0))
        total = processed + dropped
        per_stream[source["id"]] = {"frames": total, "processed": processed, "dropped": dropped,
                                    "dropped_share": _round(dropped / total if total else 1.0, 4)}
    worst = max(s["dropped_share"] for s in per_stream.values())
    return {
        "streams": streams,
        "detect_workers": used,
        "held": all(s["frames"] > 0 and s["dropped_share"] < REAL_TIME_DROP for s in per_stream.values()),
        "worst_dropped_share": worst,
        "frames": sum(s["frames"] for s in per_stream.values()),
        "dropped": sum(s["dropped"] for s in per_stream.values()),
        "faces_embedded": int(summary.faces_embedded),
        "per_stream": per_stream,
        "latency_ms": latency_report(summary.latencies_by_kind),
    }


def streams_bench(settings: Settings, path: str, max_streams: int, workers: Sequence[int | str],
                  max_frames: int | None = None) -> dict[str, Any]:
    """For each detect-worker count: a run each of 1, 2, ... `max_streams` copies of the clip as live
    cameras; `held` is the most streams that held real time (every run is made: on a busy machine one
    run may fail where a larger one holds, and the drop shares show the trend either way)."""
    if max_streams < 1:
        raise InputError(f"--streams: expected a positive number of streams, got {max_streams}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"--frames: expected a positive number of frames, got {max_frames}")
    clip = clip_info(path)
    if not clip["frames"]:
        raise InputError(f"{path}: no video frames")
    frames = min(clip["frames"], max_frames) if max_frames else clip["frames"]
    results = []
    for count in workers:
        runs = []
        for streams in range(1, max_streams + 1):
            run = live_streams_pass(settings, path, streams, count, frames)
            runs.append(run)
        held = [run for run in runs if run["held"]]
        results.append({"detect_workers": count, "held": held[-1]["streams"] if held else 0,
                        "latency_ms": held[-1]["latency_ms"] if held else None, "runs": runs})
    return {"source": path, "clip": clip, "frames_per_stream": frames, "max_streams": max_streams,
            "criterion": f"every stream drops under {REAL_TIME_DROP:.0%} of its frames", "workers": results}


def format_streams_report(result: Mapping[str, Any]) -> str:
    """The --streams result as text for people."""
    clip = result["clip"]
    title = (f"{result['source']}  ({clip['width']}x{clip['height']} at {_text(clip['fps'])} fps, "
             f"{result['frames_per_stream']} frames per stream, live; held: {result['criterion']})")
    lines = [title, ""]
    for entry in result["workers"]:
        lines.append(f"detect workers {entry['detect_workers']}: {entry['held']} stream(s) held real time")
        for run in entry["runs"]:
            latency = run["latency_ms"]
            kinds = "  ".join(f"{kind} {_text(stats['p95'])}" for kind, stats in latency["by_kind"].items()
                              if kind not in ("heartbeat", "stream.status"))
            lines.append(f"  {run['streams']:>3} streams ({run['detect_workers']} worker(s)): "
                         f"{'held' if run['held'] else 'NOT held'}, worst drop {run['worst_dropped_share']:.1%}, "
                         f"{run['dropped']}/{run['frames']} frames dropped; p95 ms: {kinds or '-'}")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _text(value: Any) -> str:
    return "-" if value is None else str(value)
