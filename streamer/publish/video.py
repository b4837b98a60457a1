"""Annotated video output: H.264 in MP4 through PyAV (libx264, yuv420p)."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from streamer.errors import ConfigError

log = logging.getLogger(__name__)

# veryfast keeps encoding well ahead of the pipeline on 2 cores; crf 23 is x264's visually-fine default.
DEFAULT_OPTIONS = {"preset": "veryfast", "crf": "23"}


class VideoWriter:
    """Writes BGR frames to an H.264 .mp4 file.

    yuv420p needs even dimensions, so an odd width or height is encoded one pixel smaller (the last row or
    column is cropped). Each frame's pts is its frame index, so a sampled stream can pass the source index
    and keep its timing; without one, frames are numbered 0, 1, 2, ...
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        width: int,
        height: int,
        *,
        options: dict[str, str] | None = None,
        setting: str = "output.path",
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps: expected > 0, got {fps}")
        if width < 2 or height < 2:
            raise ValueError(f"width, height: expected >= 2 pixels, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.encoded_width, self.encoded_height = width - width % 2, height - height % 2
        self.frames = 0
        self._last_pts = -1
        rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 30000/1001
        # Opened here rather than by FFmpeg, which only touches the file when the first packet is written:
        # a missing folder or a read-only path must fail now, with the OS's reason.
        try:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot write video {str(self.path)!r}: {exc.strerror or exc}") from None
        try:
            self._container = av.open(self._file, mode="w", format="mp4")
            self._stream = self._container.add_stream(
                "libx264", rate=rate, options=dict(options or DEFAULT_OPTIONS)
            )
            self._stream.width = self.encoded_width
            self._stream.height = self.encoded_height
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.time_base = 1 / rate
        except BaseException:
            self._file.close()
            raise
        log.info("writing %dx%d @ %s fps H.264 to %s", self.encoded_width, self.encoded_height, rate, self.path)

    @property
    def closed(self) -> bool:
        return self._container is None

    def write(self, image_bgr: np.ndarray, index: int | None = None) -> None:
        """Encode one frame; `index` (frame number at the writer's fps) must increase from call to call."""
        if self._container is None:
            raise RuntimeError("VideoWriter.write after close()")
        if image_bgr.dtype != np.uint8 or image_bgr.shape != (self.height, self.width, 3):
            raise ValueError(
                f"image: expected uint8 ({self.height}, {self.width}, 3), got {image_bgr.dtype} {image_bgr.shape}"
            )
        pts = self._last_pts + 1 if index is None else int(index)
        if pts <= self._last_pts:
            raise ValueError(f"index: expected > {self._last_pts} (increasing), got {pts}")
        image = image_bgr[: self.encoded_height, : self.encoded_width]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        frame.pts = pts
        self._container.mux(self._stream.encode(frame))
        self._last_pts = pts
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file; safe to call twice."""
        if self._container is None:
            return
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            try:
                self._container.close()
            finally:
                self._file.close()
                self._container = None
        log.info("wrote %d frames to %s", self.frames, self.path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
