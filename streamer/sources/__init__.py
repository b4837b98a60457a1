"""Video sources: one reader thread per input, frames out as `streamer.types.Frame`.

URL kinds (see `parse_url`):
    /path/clip.mp4, file:///path/clip.mp4      file (not live): every frame with backpressure, or sampled
    rtsp://..., rtsps://...                     network camera (live)
    http://..., https://...                     HTTP stream or remote file (live unless settings.live=False)
    0, webcam:0, /dev/video0                    local camera through OpenCV (live)
    lavfi:testsrc2=size=1280x720:rate=30        FFmpeg test source, paced to its frame rate (live)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from streamer.config import ReconnectSettings, SourceSettings
from streamer.errors import SourceError
from streamer.sources.base import (
    Source,
    SourceStats,
    StatusChange,
    ThreadedSource,
    backoff_delays,
)
from streamer.sources.pyav import PyAVSource
from streamer.sources.webcam import WebcamSource

__all__ = [
    "ParsedUrl",
    "PyAVSource",
    "Source",
    "SourceStats",
    "StatusChange",
    "ThreadedSource",
    "WebcamSource",
    "backoff_delays",
    "open_source",
    "parse_url",
]

UrlKind = Literal["file", "rtsp", "http", "lavfi", "webcam"]
_WEBCAM = re.compile(r"^(?:webcam:)?(\d+)$|^/dev/video(\d+)$")
_SCHEMES: dict[str, UrlKind] = {"rtsp": "rtsp", "rtsps": "rtsp", "http": "http", "https": "http", "file": "file"}


@dataclass(frozen=True)
class ParsedUrl:
    kind: UrlKind
    target: str  # a path, a URL, a filter graph, or a camera index as text
    live: bool  # the default for this kind; settings.live overrides it


def parse_url(url: str) -> ParsedUrl:
    """Classify a source URL; raises SourceError for empty URLs and unsupported schemes."""
    text = url.strip()
    if not text:
        raise SourceError("source url is empty")
    if match := _WEBCAM.match(text):
        return ParsedUrl("webcam", match.group(1) or match.group(2), live=True)
    if text.startswith("lavfi:"):
        graph = text.removeprefix("lavfi:")
        if not graph:
            raise SourceError(f"source {url!r}: expected a filter graph after 'lavfi:'")
        return ParsedUrl("lavfi", graph, live=True)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        kind = _SCHEMES.get(scheme)
        if kind is None:
            known = ", ".join(f"{s}://" for s in _SCHEMES)
            raise SourceError(
                f"source {url!r}: unsupported scheme {scheme}:// (expected a file path, {known}, "
                "webcam:N or lavfi:<graph>)"
            )
        if kind == "file":
            return ParsedUrl("file", unquote(urlparse(text).path), live=False)
        return ParsedUrl(kind, text, live=True)
    return ParsedUrl("file", str(Path(text).expanduser()), live=False)


def open_source(settings: SourceSettings, stream_id: str, reconnect: ReconnectSettings) -> Source:
    """Build the source for `settings` (not started yet: call `start()`, which opens files and lavfi
    graphs synchronously and raises SourceError for a bad one). A missing file fails here already."""
    parsed = parse_url(settings.url)
    live = parsed.live if settings.live is None else settings.live
    if parsed.kind == "file" and not Path(parsed.target).is_file():
        raise SourceError(f"source {stream_id}: video file {parsed.target} does not exist")
    if parsed.kind == "webcam":
        return WebcamSource(
            stream_id, settings.url, device=int(parsed.target), live=live, reconnect=reconnect, fps=settings.fps,
            max_frames=settings.max_frames,
        )
    return PyAVSource(
        stream_id,
        settings.url,
        kind=parsed.kind,
        target=parsed.target,
        live=live,
        reconnect=reconnect,
        fps=settings.fps,
        loop=settings.loop,
        max_frames=settings.max_frames,
    )
