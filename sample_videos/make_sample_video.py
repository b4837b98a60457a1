"""Make sample_videos/astronaut.mp4 (and the still astronaut.jpg to enroll) from a public-domain photo that scikit-image ships.

The photo is NASA's portrait of astronaut Eileen Collins (public domain, `skimage.data.astronaut()`).
The clip moves and zooms two copies of her across a 1280x720 canvas (one mirrored) so that detection,
tracking and recognition all have something to do, without shipping anyone's face that we may not.

    python sample_videos/make_sample_video.py [--out sample_videos/astronaut.mp4] [--seconds 8]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import av
import cv2
import numpy as np

WIDTH, HEIGHT, FPS = 1280, 720, 30


def astronaut_bgr() -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("scikit-image is needed to build the sample video: pip install scikit-image") from None
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def background(t: float) -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = 90 + 40 * np.sin(x / 160 + t) + 30 * np.cos(y / 120 - 0.5 * t)
    return np.dstack([base * 0.8, base * 0.9, base]).clip(0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, tile: np.ndarray, cx: float, cy: float) -> None:
    h, w = tile.shape[:2]
    x0, y0 = int(cx - w / 2), int(cy - h / 2)
    x1, y1 = max(x0, 0), max(y0, 0)
    x2, y2 = min(x0 + w, WIDTH), min(y0 + h, HEIGHT)
    if x2 > x1 and y2 > y1:
        canvas[y1:y2, x1:x2] = tile[y1 - y0 : y2 - y0, x1 - x0 : x2 - x0]


def render(photo: np.ndarray, index: int) -> np.ndarray:
    t = index / FPS
    canvas = background(t)
    # The main subject walks left to right and comes closer (grows); a mirrored second subject
    # appears after two seconds on the right so a second track starts mid-clip.
    scale = 0.55 + 0.25 * (0.5 - 0.5 * math.cos(t * 0.8))
    tile = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    paste(canvas, tile, 300 + 90 * t, 380 + 20 * math.sin(t * 2))
    if t >= 2.0:
        small = cv2.resize(cv2.flip(photo, 1), None, fx=0.45, fy=0.45, interpolation=cv2.INTER_AREA)
        paste(canvas, small, 1080 - 25 * (t - 2.0), 250)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("astronaut.mp4")))
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    photo = astronaut_bgr()
    still = Path(args.out).with_suffix(".jpg")
    cv2.imwrite(str(still), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    with av.open(args.out, "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "28", "preset": "medium"}
        for index in range(int(args.seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(render(photo, index), format="bgr24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    print(f"wrote {args.out} and {still}")


if __name__ == "__main__":
    main()
