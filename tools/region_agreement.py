"""How closely region detection reproduces a full detection, on a clip: landmarks and misses.

For every `--every`-th frame, each face of a full detection is looked for again with `detect_regions` in the
region adaptive detection would draw around it; prints the landmark differences (largest coordinate error
per face, frame pixels) and how many faces the region missed. `--align` overrides the detector's grid
(`region_align`, in network-input pixels; 1 = the old 2-pixel grid at 1280 -> 640) to compare.

    python tools/region_agreement.py CLIP [--align 1] [--every 3]
"""

from __future__ import annotations

import argparse

import av
import numpy as np

from streamer.config import load_settings
from streamer.models.factory import ModelFactory
from streamer.track.bytetrack import box_iou
from streamer.track.processor import region_boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip")
    parser.add_argument("--align", type=int, help="region grid in network-input pixels (default: the detector's)")
    parser.add_argument("--every", type=int, default=3, help="use every n-th frame (default 3)")
    args = parser.parse_args()
    detector = ModelFactory(load_settings()).detector(for_tracking=True)
    if args.align is not None:
        detector.region_align = args.align  # this instance only
    errors, missed = [], 0
    with av.open(args.clip) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % args.every:
                continue
            image = frame.to_ndarray(format="bgr24")
            height, width = image.shape[:2]
            full = detector.detect(image)
            for k in range(len(full)):
                found = detector.detect_regions(image, region_boxes(full.boxes[k:k + 1], width, height))
                if not len(found):
                    missed += 1
                    continue
                same = int(np.argmax(box_iou(full.boxes[k:k + 1], found.boxes)[0]))
                errors.append(float(np.abs(full.landmarks[k] - found.landmarks[same]).max()))
    detector.close()
    e = np.asarray(errors)
    print(f"{args.clip}: region_align {detector.region_align}: {len(e) + missed} faces, {missed} missed by their "
          f"region; landmark error px median {np.median(e):.2f}, p90 {np.percentile(e, 90):.2f}")


if __name__ == "__main__":
    main()
