"""Per-model timings on this machine: detection per 1280x720 frame, embedding and attribute heads per face.

    python tools/bench_models.py [--repeats 30] [--json]

Needs STREAMER_MODEL_DIR (and allows the non-commercial detectors only for this measurement).
Medians over repeats after a warm-up; real faces (YuNet on a real photo) feed the embedders and heads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np

from streamer.config import load_settings
from streamer.engine import FaceEngine, load_image
from streamer.infer.attributes import prepare_function

MEDIA = Path(os.environ.get("STREAMER_MEDIA_DIR", Path(__file__).resolve().parents[2] / "shared" / "media"))


def median_ms(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {"detect_ms_per_1280x720_frame": {}, "ms_per_face": {}}

    photo = load_image(MEDIA / "facenet_pytorch/data/multiface.jpg")
    frame = cv2.resize(photo, (1280, 720), interpolation=cv2.INTER_AREA)
    detectors = [("yunet", "onnxruntime"), ("yunet", "opencv"), ("blazeface", None), ("scrfd_500m", None), ("scrfd_2.5g", None)]
    for name, backend in detectors:
        for max_side in (640, 320):
            detector_settings = {"name": name, "max_side": max_side}
            if backend:
                detector_settings["backend"] = backend
            settings = load_settings(overrides={"detector": detector_settings, "models": {"allow_noncommercial": True}})
            with FaceEngine(settings) as engine:
                label = f"{name}{'/' + backend if backend else ''}@{max_side}"
                results["detect_ms_per_1280x720_frame"][label] = median_ms(
                    lambda: engine.detector.detect(frame), args.repeats
                )

    settings = load_settings(overrides={"models": {"allow_noncommercial": True}})
    with FaceEngine(settings) as engine:
        faces = engine.detector.detect(photo)
        batch16 = faces[np.arange(16) % len(faces)]
        one = faces[0]
        for embedder_name in ("dlib_resnet", "mobilefacenet"):
            embed_settings = load_settings(
                overrides={"embedder": {"name": embedder_name}, "models": {"allow_noncommercial": True}}
            )
            embedder = FaceEngine(embed_settings).embedder
            chips1, chips16 = embedder.spec.prepare(photo, one), embedder.spec.prepare(photo, batch16)
            results["ms_per_face"][f"{embedder_name}@1"] = median_ms(lambda: embedder.embed(chips1), args.repeats)
            results["ms_per_face"][f"{embedder_name}@16"] = round(
                median_ms(lambda: embedder.embed(chips16), args.repeats) / 16, 2
            )
        for head_name in ("age", "gender", "emotion"):
            head = engine.head(head_name)
            prepare = prepare_function(head_name)
            crops1, crops16 = prepare(photo, one), prepare(photo, batch16)
            results["ms_per_face"][f"{head_name}@1"] = median_ms(lambda: head.predict(crops1), args.repeats)
            results["ms_per_face"][f"{head_name}@16"] = round(
                median_ms(lambda: head.predict(crops16), args.repeats) / 16, 2
            )
    if args.json:
        print(json.dumps(results))
    else:
        for section, values in results.items():
            print(section)
            for key, value in values.items():
                print(f"  {key:<28} {value:>8.2f}")


if __name__ == "__main__":
    main()
