"""One stream's per-frame work alone: `StreamProcessor.process` (scene cut, detection, tracking, the gate,
chip preparation) over a clip's frames decoded beforehand, so neither decoding nor inference is timed.
Settings come from the environment (STREAMER_...), so two configurations, or two checkouts
(PYTHONPATH=other/tree), can be compared run for run, interleaved:

    python tools/processor_time.py out/bench-720p.mp4
    STREAMER_DETECTOR__MAX_INTERVAL=10 python tools/processor_time.py out/bench-720p.mp4
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from streamer.config import Settings
from streamer.infer.chips import ChipPreparer
from streamer.models.factory import ModelFactory
from streamer.pipeline.bench import read_frames
from streamer.track.processor import StreamProcessor


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    settings = Settings()
    factory = ModelFactory(settings)
    detector = factory.detector(for_tracking=True)
    detector.detect(np.zeros((720, 1280, 3), np.uint8))  # first-run setup, as the detect worker does
    chips = ChipPreparer(factory.embedder_spec, settings.attributes.enabled)
    processor = StreamProcessor.from_settings("bench", settings, detector, chips.prepare)
    frames = list(read_frames(sys.argv[1]))
    start = time.perf_counter()
    for frame in frames:
        processor.process(frame)
    seconds = time.perf_counter() - start
    detected, regions = processor.detected_frames, processor.region_frames
    print(json.dumps({"frames": len(frames), "ms_per_frame": round(1000 * seconds / len(frames), 2),
                      "full": detected - regions, "regions": regions, "predicted": len(frames) - detected}))


if __name__ == "__main__":
    main()
