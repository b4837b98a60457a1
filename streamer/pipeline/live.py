"""Live tiles: the annotated frames of the streams someone watches, on their way to the viewers.

    viewer (uvicorn thread)  -- with hub.watch(stream) -->  FrameHub (supervisor process)
    supervisor thread        -- Watch commands, renewed -->  detect worker
    detect worker            -- LiveRenderer: draw, downscale, JPEG, at most serve.live_fps -->  frames channel
    supervisor thread        -- hub.put -->  FrameHub  -- wait_next / latest -->  viewers

Nothing is drawn or encoded for a stream nobody watches: the worker renders only streams with a watch that
has not expired, and the supervisor renews watches only while the hub counts a watcher. A viewer that goes
away (its `with` block ends) stops the encoding within a loop of the supervisor; a supervisor that hangs
stops it within the watch's time to live.

`StreamView` (what `Supervisor.streams()` returns) lives here too: it is what the console shows per tile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import cv2
import numpy as np

from streamer.imaging import encode_jpeg
from streamer.publish.annotate import FaceLabel, draw_faces
from streamer.types import Faces

StreamStatusName = Literal["connecting", "connected", "lost", "reconnected", "ended"]
LIVE_JPEG_QUALITY = 80  # a tile is looked at, not analysed: a third of quality 90's bytes


@dataclass(frozen=True, eq=False)
class LiveFrame:
    stream: str
    index: int  # increases by one per tile of this stream that reached the hub
    frame: int  # the source's frame number
    pts: float
    decoded_at: float  # time.monotonic() when the frame was decoded (latency = received_at - decoded_at)
    encoded_at: float
    jpeg: bytes = field(repr=False)
    received_at: float = 0.0  # time.monotonic() when it reached the hub


@dataclass(frozen=True)
class StreamView:
    """One stream as the console shows it. `live`: the source is live (a camera, or a file played as one),
    i.e. frames are dropped rather than waited for."""

    id: str
    url: str  # credentials redacted
    status: StreamStatusName
    fps: float
    frames: int
    dropped: int
    reconnects: int
    live: bool
    detail: str = ""  # what the last status change said, e.g. why the stream was lost or ended


def redact_url(url: str) -> str:
    """`url` with any password replaced by *** (rtsp://user:***@host/...); anything else unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc or parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


class FrameHub:
    """The latest tile per stream, and who watches which stream; thread-safe.

    The supervisor thread puts tiles; any thread watches and waits. `wait_next(stream, after)` returns the
    first tile with an index above `after` (pass the index of the tile you have; -1 or 0 for any): a viewer
    that wants a fresh picture passes `latest(stream).index`, or gets the one kept from an earlier watch.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._watchers: dict[str, int] = {}
        self._latest: dict[str, LiveFrame] = {}
        self._count: dict[str, int] = {}
        self._closed = False

    @contextmanager
    def watch(self, stream: str) -> Iterator[None]:
        """While any `with hub.watch(stream)` block runs, the stream's tiles are rendered and sent."""
        with self._cond:
            self._watchers[stream] = self._watchers.get(stream, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._watchers.get(stream, 1) - 1
                if left > 0:
                    self._watchers[stream] = left
                else:
                    self._watchers.pop(stream, None)

    def watchers(self, stream: str) -> int:
        with self._cond:
            return self._watchers.get(stream, 0)

    def watched(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._watchers)

    def put(self, stream: str, frame: int, pts: float, decoded_at: float, encoded_at: float,
            jpeg: bytes) -> LiveFrame:
        with self._cond:
            index = self._count.get(stream, 0) + 1
            self._count[stream] = index
            tile = LiveFrame(stream, index, frame, pts, decoded_at, encoded_at, jpeg, self._clock())
            self._latest[stream] = tile
            self._cond.notify_all()
            return tile

    def latest(self, stream: str) -> LiveFrame | None:
        with self._cond:
            return self._latest.get(stream)

    def wait_next(self, stream: str, after: int, timeout: float) -> LiveFrame | None:
        """The stream's latest tile once its index is above `after`, waiting up to `timeout` seconds;
        None on timeout, when the stream is forgotten (removed) or the hub is closed."""
        deadline = self._clock() + max(0.0, timeout)
        with self._cond:
            while True:
                tile = self._latest.get(stream)
                if tile is not None and tile.index > after:
                    return tile
                left = deadline - self._clock()
                if self._closed or left <= 0:
                    return None
                self._cond.wait(left)

    def forget(self, stream: str) -> None:
        """The stream was removed: its last picture goes (it is memory only, and nobody should see it)."""
        with self._cond:
            self._latest.pop(stream, None)
            self._cond.notify_all()

    def close(self) -> None:
        """The pipeline stopped: every waiter returns None now."""
        with self._cond:
            self._closed = True
            self._latest.clear()
            self._cond.notify_all()


class LiveRenderer:
    """The detect worker's side: which frames become tiles (at most `fps` a second per stream) and how.

    A tile is the frame downscaled to `max_width` first, then drawn on (boxes, names, --blur-unknown), so
    the labels stay legible at tile size and the drawing costs a fraction of a full-size one."""

    def __init__(self, fps: float, max_width: int, blur_unknown: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if fps <= 0 or max_width < 1:
            raise ValueError(f"fps and max_width: expected > 0, got {fps}, {max_width}")
        self.interval = 1.0 / fps
        self.max_width = max_width
        self.blur_unknown = blur_unknown
        self._clock = clock
        self._due: dict[str, float] = {}

    def due(self, stream: str, now: float | None = None) -> bool:
        """True (and the slot is taken) when `stream` may send a tile now."""
        now = self._clock() if now is None else now
        due = self._due.get(stream, float("-inf"))
        if now < due:
            return False
        # On schedule, tiles stay `interval` apart on average; after a pause the next waits half of one,
        # so no burst makes up for it.
        self._due[stream] = max(due + self.interval, now + self.interval / 2)
        return True

    def forget(self, stream: str) -> None:
        self._due.pop(stream, None)

    def render(self, image: np.ndarray, detections: Faces | None,
               labels: Sequence[FaceLabel | None]) -> bytes:
        """The JPEG tile of one BGR frame with its faces (`labels`: one per detection, as
        AnnotatedOutput.labels gives them)."""
        height, width = image.shape[:2]
        scale = min(1.0, self.max_width / width)
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        if detections is not None and len(detections):
            known = np.array([label is not None and label.known for label in labels], bool)
            blur = ~known if self.blur_unknown else None
            image = draw_faces(image, detections.boxes * scale, labels, blur)
        return encode_jpeg(image, LIVE_JPEG_QUALITY)
