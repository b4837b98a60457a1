"""Webcam backend through OpenCV (PyAV's bundled FFmpeg has no v4l2 input).

`cv2.VideoCapture.read()` has no timeout: a camera that hangs inside the driver is reported lost by the
watchdog, and stop() gives up on that thread after its join timeout (it is a daemon thread).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

# OpenCV's native log lines ("[ERROR:2@2.419] global obsensor_uvc_stream_channel.cpp:163 ... Camera index
# out of range", "[ WARN:0@0.034] global cap_v4l.cpp:915 open VIDEOIO(V4L2:/dev/video0)") come from probing
# every capture backend for a camera index; we report a camera that does not open in our own words. The
# environment only counts before cv2's first import, hence before `import cv2` (the sources package imports
# this module first); _quiet_opencv() covers a cv2 that something else imported earlier.
_VERBOSE_LEVELS = {"WARNING", "WARN", "W", "INFO", "I", "DEBUG", "D", "VERBOSE", "V"}
if os.environ.get("OPENCV_LOG_LEVEL", "").upper() not in _VERBOSE_LEVELS:  # someone debugging OpenCV
    os.environ["OPENCV_LOG_LEVEL"] = "SILENT"
os.environ.setdefault("OPENCV_VIDEOIO_DEBUG", "0")

import cv2  # noqa: E402

from streamer.config import ReconnectSettings  # noqa: E402
from streamer.sources.base import RawFrame, ThreadedSource  # noqa: E402

log = logging.getLogger(__name__)


def _quiet_opencv() -> None:
    """Silence OpenCV's own logging unless OPENCV_LOG_LEVEL asks for its warnings or more."""
    if os.environ.get("OPENCV_LOG_LEVEL", "").upper() in _VERBOSE_LEVELS:
        return
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:  # a cv2 build without the logging utilities
        pass


_quiet_opencv()


class WebcamSource(ThreadedSource[cv2.VideoCapture]):
    """A camera by index (0 = /dev/video0). `device` may also be anything else cv2.VideoCapture opens
    (a file path), which is how this backend is tested on machines without a camera."""

    def __init__(
        self,
        stream_id: str,
        url: str,
        *,
        device: int | str,
        live: bool = True,
        reconnect: ReconnectSettings | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
    ) -> None:
        if isinstance(device, int) and device < 0:
            raise ValueError(f"webcam index: expected >= 0, got {device}")
        if fps is not None and fps <= 0:
            raise ValueError(f"WebcamSource fps: expected > 0 or None, got {fps}")
        super().__init__(stream_id, url, live=live, reconnect=reconnect, max_frames=max_frames)
        self.device = device
        self.fps = fps
        self._clock_start = time.monotonic()

    def _open(self) -> cv2.VideoCapture:
        _quiet_opencv()  # again: a detector may have changed the level since (it restores its own)
        capture = cv2.VideoCapture(self.device)
        if not capture.isOpened():
            capture.release()
            what = f"camera {self.device}" if isinstance(self.device, int) else repr(self.device)
            raise OSError(
                f"cannot open {what}: no such camera, or another program is using it"
                if isinstance(self.device, int)
                else f"cannot open {what}"
            )
        if self.fps and isinstance(self.device, int):
            capture.set(cv2.CAP_PROP_FPS, self.fps)  # ask the driver first: cheaper than dropping frames
        log.info(
            "source %s: opened camera %r (%dx%d)", self.id, self.device,
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )  # fmt: skip
        return capture

    def _describe_error(self, exc: BaseException) -> str:
        if isinstance(exc, OSError):  # our own words from _open
            return str(exc)
        return super()._describe_error(exc)

    def _close(self, handle: cv2.VideoCapture) -> None:
        handle.release()

    def _iterate(self, handle: cv2.VideoCapture) -> Iterator[RawFrame]:
        period = 1.0 / self.fps if self.fps else 0.0
        next_due = 0.0
        while not self._stop.is_set():
            if period:
                # grab() skips the colour conversion of frames we would throw away anyway.
                if not handle.grab():
                    return
                now = time.monotonic()
                if now < next_due:
                    continue
                next_due = max(next_due + period, now)
                ok, image = handle.retrieve()
            else:
                ok, image = handle.read()
            if not ok or image is None:
                return  # unplugged camera or end of a file: the base treats it as a disconnect
            decoded_at = time.monotonic()
            # cv2 gives no dependable camera clock: pts is seconds since this source was created, which
            # keeps increasing across reconnects.
            yield RawFrame(image, decoded_at - self._clock_start, decoded_at)
