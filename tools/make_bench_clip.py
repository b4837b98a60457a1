"""Make the 720p30 benchmark clip: the facenet-pytorch pedestrian clip (1-6 faces) re-encoded.

The source is third-party footage used for internal benchmarks only, so the result is written to a
path you give (default out/bench-720p.mp4, git-ignored) and never committed.

    python tools/make_bench_clip.py [OUT] [--source PATH] [--loops 3]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import av
import cv2

DEFAULT_SOURCE = Path(os.environ.get("STREAMER_MEDIA_DIR", Path(__file__).resolve().parents[2] / "shared" / "media"))
DEFAULT_SOURCE = DEFAULT_SOURCE / "facenet_pytorch" / "examples" / "video.mp4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="out/bench-720p.mp4")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--loops", type=int, default=3, help="play the 4.2 s clip this many times (forth and back)")
    args = parser.parse_args()
    with av.open(args.source) as container:
        frames = [
            cv2.resize(f.to_ndarray(format="bgr24"), (1280, 720), interpolation=cv2.INTER_AREA)
            for f in container.decode(video=0)
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with av.open(args.out, "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for loop in range(args.loops):
            # Forth and back, so the loop point is not a cut that ends every track at once.
            for image in frames if loop % 2 == 0 else frames[::-1]:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        out.mux(stream.encode(None))
    print(f"wrote {args.out}: {len(frames) * args.loops} frames, 1280x720 @ 30 fps")


if __name__ == "__main__":
    main()
