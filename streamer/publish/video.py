"""Annotated video output: H.264 in MP4 through PyAV (libx264, yuv420p)."""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterator
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
        rate = self.rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 30000/1001
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
    def duration(self) -> float:
        """Seconds of video written so far (up to the end of the last frame)."""
        return float((self._last_pts + 1) / self.rate)

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


def _packets(container: av.container.InputContainer, stream: av.stream.Stream) -> Iterator[av.Packet]:
    for packet in container.demux(stream):
        if packet.dts is not None and packet.size:  # the demuxer ends with an empty flush packet
            yield packet


def copy_audio(video_path: str | Path, source: str | Path, *, start: float = 0.0,
               duration: float | None = None) -> bool:
    """Give the video-only file `video_path` the first audio stream of `source`, packets copied as they
    are (no re-encoding). `start`: the source time (seconds) of the video's first frame, so sound and
    picture stay in step; `duration`: the video's length, audio after it is dropped.

    The new file is written beside the old one and replaces it atomically: on any error the video-only
    file is left as it was and the error raised. False (nothing done) when `source` has no audio."""
    video_path = Path(video_path)
    with av.open(str(source)) as src:
        if not src.streams.audio:
            return False
        src_audio = src.streams.audio[0]
        temporary = video_path.with_name(f".{video_path.name}.{os.getpid()}.audio.tmp")
        try:
            with av.open(str(video_path)) as video, av.open(str(temporary), mode="w", format="mp4") as out:
                src_video = video.streams.video[0]
                out_video = out.add_stream_from_template(src_video)
                out_audio = out.add_stream_from_template(src_audio)
                audio_base = src_audio.time_base
                shift = round(start / audio_base)
                end = None if duration is None else round(duration / audio_base)

                def audio() -> Iterator[av.Packet]:
                    for packet in _packets(src, src_audio):
                        pts = (packet.pts if packet.pts is not None else packet.dts) - shift
                        if pts + (packet.duration or 0) < 0:
                            continue  # sound from before the first frame (the one packet across it stays:
                            # it primes the decoder, and the muxer's edit list hides what precedes 0)
                        if end is not None and pts >= end:
                            break
                        packet.dts -= shift
                        packet.pts = pts
                        packet.stream = out_audio
                        yield packet

                def pictures() -> Iterator[av.Packet]:
                    for packet in _packets(video, src_video):
                        packet.stream = out_video
                        yield packet

                # Interleaved by time, so the muxer never has to hold one stream back for the other.
                for packet in heapq.merge(pictures(), audio(), key=lambda p: p.dts * p.time_base):
                    out.mux(packet)
            os.replace(temporary, video_path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return True
