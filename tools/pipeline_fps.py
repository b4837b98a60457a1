"""Pipeline throughput alone: `streamer run` (supervisor + both workers) on a file, frames per second from
the detect worker's first to its last frame. Settings come from the environment (STREAMER_...), so two
configurations, or two checkouts (PYTHONPATH=other/tree), can be compared run for run, interleaved:

    python tools/pipeline_fps.py out/bench-720p.mp4
    STREAMER_DETECTOR__INTERVAL=2 python tools/pipeline_fps.py out/bench-720p.mp4
"""

from __future__ import annotations

import json
import sys

from streamer.config import Settings
from streamer.pipeline.run import Supervisor


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    settings = Settings(sources=[{"url": sys.argv[1], "id": "bench"}], publish={"endpoint": "tcp://127.0.0.1:*"})
    stats = Supervisor(settings).run().last_stats
    frames = stats["streams"]["bench"]["frames"]
    seconds = stats["last_frame_at"] - stats["first_frame_at"]
    print(json.dumps({"frames": frames, "fps": round(frames / seconds, 1), "faces_sent": stats.get("faces_sent")}))


if __name__ == "__main__":  # spawned workers re-import this module
    main()
