"""PyAV (FFmpeg) backend: files, RTSP, HTTP(S) and lavfi test sources.

Demux and decode are separate so one undecodable packet is skipped instead of ending the stream; skipped
packets are counted (`corrupt_packets`) and a file says how many at its end (`end_note`). Frames that fps
sampling skips are never converted to BGR (the conversion is the expensive part after decoding).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import av
import av.error
import numpy as np
from av.video.reformatter import VideoReformatter

from streamer.config import ReconnectSettings
from streamer.errors import SourceError
from streamer.logutil import RateLimitedLog
from streamer.sources.base import RETRY_LOG_INTERVAL_S, RawFrame, ThreadedSource

log = logging.getLogger(__name__)


class BgrConverter:
    """Decoded frames to BGR arrays, the way every PyAV reader here (sources, the bench's decode pass) does it.

    One reformatter per reader, on one thread: `VideoFrame.to_ndarray(format="bgr24")` builds a new
    converter for every frame and, by default, starts and joins a pool of scaling threads each time (two a
    frame on a 2-core machine, ~630 threads in a 315-frame run). Reusing one single-threaded converter gives
    the same pixels for ~40% less CPU a 720p frame (measured 0.49 against 0.80 CPU-ms), which a busy host
    needs more than the converter's own parallelism. Not thread-safe: one per reading thread.
    """

    def __init__(self) -> None:
        self._reformatter = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="bgr24", threads=1).to_ndarray()


Kind = Literal["file", "rtsp", "http", "lavfi"]

# Small probe windows: the default (5 s / 5 MB) makes an RTSP open take ~0.75 s instead of ~0.1 s.
# No "fflags nobuffer": it discards the packets read while probing, key frame included, so a stream with
# long GOPs (an .mp4 served over RTSP, many cameras) decodes nothing until the next key frame, maybe never.
_LOW_LATENCY = {"analyzeduration": "100000", "probesize": "32768", "flags": "low_delay"}


@dataclass
class _Handle:
    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    rate: float | None  # frames per second from the container, for pts fallback and loop offsets
    pending: list[av.VideoFrame] = field(default_factory=list)  # decoded while probing, not yet delivered


_READ_GRACE_S = 1.0


def _micros(seconds: float) -> str:
    return str(int(seconds * 1_000_000))


# ---------------------------------------------------------------------- network errors in plain words

Cause = Literal["refused", "unreachable", "timeout", "silent", "name", "unauthorized", "forbidden", "not_found"]
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
_ERRNO_CAUSES: dict[int, Cause] = {
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.ETIMEDOUT: "timeout",
}
# FFmpeg's (and the C library's) words for each cause, lower case, checked in this order.
_TEXT_CAUSES: list[tuple[str, Cause]] = [
    ("401", "unauthorized"),
    ("unauthorized", "unauthorized"),
    ("403", "forbidden"),
    ("forbidden", "forbidden"),
    ("404", "not_found"),
    ("not found", "not_found"),
    ("connection refused", "refused"),
    ("no route to host", "unreachable"),
    ("network is unreachable", "unreachable"),
    ("host is unreachable", "unreachable"),
    ("timed out", "timeout"),
    ("name or service not known", "name"),
    ("temporary failure in name resolution", "name"),
    ("no address associated with hostname", "name"),
    ("nodename nor servname", "name"),
    ("failed to resolve hostname", "name"),
]


def error_cause(error: BaseException | str) -> Cause | None:
    """The cause an error names unambiguously, or None (FFmpeg's "Invalid data found when processing
    input" for an unreachable address, "Input/output error" for a bad host name, "Immediate exit
    requested" for an open that timed out: then only a probe of the address can tell)."""
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code in _ERRNO_CAUSES:
        return _ERRNO_CAUSES[code]
    text = (getattr(error, "strerror", None) or str(error)).lower()
    if "file not found" in text:  # not a server's 404
        return None
    for words, cause in _TEXT_CAUSES:
        if words in text:
            return cause
    return None


def _endpoint(url: str) -> tuple[str, int, str]:
    """(host, port, path) of a network URL, without the user name and password."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.hostname or "", port or _DEFAULT_PORTS.get(parts.scheme.lower(), 554), parts.path or "/"


def probe_endpoint(host: str, port: int, timeout_s: float = 1.0) -> Cause | Literal["open"] | None:
    """Ask the network what FFmpeg would not say: does the name resolve, does host:port accept a TCP
    connection? "open" when it does; None when the probe itself tells nothing."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return "name" if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)) else None
    except (OSError, UnicodeError):
        return None
    cause: Cause | Literal["open"] | None = None
    for family, kind, proto, _, address in addresses[:2]:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout_s)
                sock.connect(address)
            return "open"
        except TimeoutError:
            cause = "timeout"
        except OSError as exc:
            cause = _ERRNO_CAUSES.get(exc.errno or 0, cause)
    return cause


def describe_stream_error(url: str, error: BaseException | str, cause: Cause | None) -> str:
    """Words a camera owner understands for a failed network stream, FFmpeg's own text after them in
    parentheses. `cause` comes from `error_cause`, or a probe where the error was ambiguous."""
    text = (getattr(error, "strerror", None) or str(error)) if isinstance(error, BaseException) else error
    host, port, path = _endpoint(url)
    where = f"{host}:{port}"
    words = {
        "refused": f"cannot reach {where}: connection refused — is the camera on and the port right?",
        "unreachable": f"cannot reach {where}: no route to host — is the address right and is the camera on "
        "this network (and switched on)?",
        "timeout": f"cannot reach {where}: no answer (timed out) — is the address right, is the camera on, "
        "or does a firewall block the port?",
        "silent": f"{where} accepts connections but did not answer as a stream server (timed out) — is this "
        "the camera's streaming port?",
        "name": f"cannot find host {host}: name not found — check the address for typos, or use the "
        "camera's IP address",
        "unauthorized": f"{where} refused the login (401 unauthorised) — check the user name and password "
        "in the URL (rtsp://USER:PASSWORD@host/...)",
        "forbidden": f"{where} refused access to {path} (403 forbidden) — does this user have the right to "
        "view the stream?",
        "not_found": f"{where} has no stream at {path} (404 not found) — check the stream path in the URL "
        "(the camera's manual lists it)",
    }.get(cause or "")
    return f"{words} ({text})" if words else text


def explain_stream_error(url: str, error: BaseException | str, probe_timeout_s: float = 1.0) -> str:
    """`describe_stream_error`, probing the address first when FFmpeg's text leaves the cause open."""
    cause = error_cause(error)
    if cause is None:
        host, port, _ = _endpoint(url)
        probed = probe_endpoint(host, port, probe_timeout_s) if host else None
        if probed == "open":
            # The port answers TCP; FFmpeg failing to read anything from it means a silent server. Other
            # errors (a real protocol error) keep FFmpeg's own words.
            ambiguous = isinstance(error, (av.error.InvalidDataError, av.error.ExitError)) or (
                isinstance(error, BaseException) and getattr(error, "errno", None) == errno.EIO
            )
            cause = "silent" if ambiguous else None
        else:
            cause = probed
    return describe_stream_error(url, error, cause)


class PyAVSource(ThreadedSource[_Handle]):
    """A video input opened with `av.open`.

    kind   "file" (a path), "rtsp" (rtsp:// or rtsps://), "http" (http(s)://), "lavfi" (a filter graph,
           e.g. "testsrc2=size=1280x720:rate=30").
    fps    sample to this rate by pts (None: every frame).
    loop   files: replay from the start at the end (pts keep increasing across replays).
    max_frames  end after delivering this many frames (after fps sampling; loops included).
    pace   deliver frames at their pts rate in wall time. Default: on for live files and lavfi, which
           FFmpeg otherwise produces as fast as it can; network streams pace themselves.
    """

    def __init__(
        self,
        stream_id: str,
        url: str,
        *,
        kind: Kind,
        target: str,
        live: bool,
        reconnect: ReconnectSettings | None = None,
        fps: float | None = None,
        loop: bool = False,
        pace: bool | None = None,
        max_frames: int | None = None,
    ) -> None:
        if kind not in ("file", "rtsp", "http", "lavfi"):
            raise ValueError(f"PyAVSource kind: expected file, rtsp, http or lavfi, got {kind!r}")
        if fps is not None and fps <= 0:
            raise ValueError(f"PyAVSource fps: expected > 0 or None, got {fps}")
        super().__init__(stream_id, url, live=live, reconnect=reconnect, loop=loop, max_frames=max_frames)
        self.kind = kind
        self.target = target  # what av.open gets: a path, a URL or a filter graph
        self.fps = fps
        self.pace = live and kind in ("file", "lavfi") if pace is None else pace
        # Local inputs open instantly and deterministically, and a non-live input is never retried: open
        # those in start() so a bad one fails fast with SourceError.
        self._open_in_start = kind in ("file", "lavfi") or not live
        self._pts_offset = 0.0  # seconds added to pts after each replay of a looped file
        self._decoded_until: float | None = None  # end (pts + one frame) of the last decoded frame
        self._decoded_count = 0  # frames decoded, before fps sampling
        # pts (offset included) one frame after the last frame delivered: a reopened file (a live file the
        # watchdog gave up on) continues from there instead of going back in time.
        self._next_pts: float | None = None
        self._corrupt_log = RateLimitedLog(log, RETRY_LOG_INTERVAL_S)
        self._open_failure: BaseException | None = None  # the last av.open error

    # ------------------------------------------------------------------ backend hooks

    def _options(self) -> tuple[str | None, dict[str, str]]:
        r = self.reconnect
        # `timeout` is the socket I/O timeout in microseconds, only a backstop behind PyAV's interrupt
        # callback (see _open), so it is the longest of the bounds.
        socket_timeout = _micros(r.open_timeout_s + r.frame_timeout_s + _READ_GRACE_S)
        if self.kind == "rtsp":
            return None, {"rtsp_transport": "tcp", "timeout": socket_timeout, **_LOW_LATENCY}
        if self.kind == "http":
            options = {"timeout": socket_timeout}
            return None, options | _LOW_LATENCY if self.live else options
        if self.kind == "lavfi":
            return "lavfi", {}
        return None, {}

    def _open(self) -> _Handle:
        if self.kind == "file" and not Path(self.target).is_file():
            raise SourceError(f"source {self.id}: video file {self.target} does not exist")
        fmt, options = self._options()
        # timeout=(open, read) arms FFmpeg's interrupt callback: a dead peer cannot block us forever and
        # stop() is noticed within these bounds. The read bound is a little longer than the watchdog's: an
        # interrupted RTSP read first hands out the packet its parser held back (a stale frame that would
        # reset the frame age), so the watchdog must have declared the connection dead before that.
        try:
            container = av.open(
                self.target,
                format=fmt,
                options=options,
                timeout=(self.reconnect.open_timeout_s, self.reconnect.frame_timeout_s + _READ_GRACE_S),
            )
        except Exception as exc:
            self._open_failure = exc  # for _describe_error
            raise
        try:
            if not container.streams.video:
                raise SourceError(f"source {self.id}: {self.url} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        except BaseException:
            container.close()
            raise
        handle = _Handle(container, stream, float(rate) if rate else None)
        self.frame_rate = self.fps or handle.rate
        if self.kind == "file" and not self.loop and stream.frames:
            duration_s = stream.frames / handle.rate if handle.rate else None
            self.total_frames = int(stream.frames if not self.fps or not duration_s else duration_s * self.fps)
            if self.max_frames is not None:
                self.total_frames = min(self.total_frames, self.max_frames)
        if self.kind == "file" or not self.live:
            self._probe(handle)
        log.info(
            "source %s: opened %s (%s, %dx%d, %s fps)",
            self.id, self.url, stream.codec_context.name, stream.codec_context.width,
            stream.codec_context.height, f"{handle.rate:.2f}" if handle.rate else "?",
        )  # fmt: skip
        return handle

    def _probe(self, handle: _Handle) -> None:
        """Decode the first frame now, so a file whose header parses but whose video does not (or a remote
        file that cannot be read) fails at start() rather than ending silently with zero frames."""
        frames = self._decode(handle)
        try:
            first = next(frames, None)
        except BaseException:
            handle.container.close()
            raise
        finally:
            frames.close()  # the decoder keeps its state; the next demux() continues where this one stopped
        if first is None:
            handle.container.close()
            raise SourceError(f"source {self.id}: {self.url} holds no decodable video frame")
        handle.pending.append(first)

    def _close(self, handle: _Handle) -> None:
        handle.container.close()

    def _describe_error(self, exc: BaseException) -> str:
        if self.kind in ("rtsp", "http") and isinstance(exc, (OSError, av.error.FFmpegError)):
            if exc is self._open_failure:  # probing the address tells why a connection never came up
                return explain_stream_error(self.target, exc, min(1.0, self.reconnect.open_timeout_s))
            return describe_stream_error(self.target, exc, error_cause(exc))  # mid-stream: no probe
        if isinstance(exc, av.error.FFmpegError):
            return exc.strerror or str(exc)
        return super()._describe_error(exc)

    def _end_of_input(self, handle: _Handle) -> str:
        """A file that ends well before the duration its container announces was cut short (a partial
        copy or download, a recording that stopped): say so, with where it ends."""
        stream = handle.stream
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif handle.container.duration:
            duration = handle.container.duration / 1_000_000
        end = self._decoded_until
        notes = []
        if duration and end is not None and not self.loop and self.max_frames is None:
            frame_time = 1.0 / handle.rate if handle.rate else 0.04
            # a little slack: the last frame's pts plus its length, rounding, an edit list trimming the start
            if end + frame_time < duration - max(3 * frame_time, 0.02 * duration):
                counts = f", {self._decoded_count} of {stream.frames} frames" if stream.frames else ""
                notes.append(f"file truncated at {end:.1f} s of {duration:.1f} s{counts}")
        if self.corrupt_packets:
            plural = "s" if self.corrupt_packets != 1 else ""
            notes.append(f"{self.corrupt_packets} corrupt packet{plural} skipped")
        if not notes:
            return super()._end_of_input(handle)
        self.end_note = "; ".join(notes)
        log.warning("source %s: %s: %s", self.id, self.url, self.end_note)
        return f"end of file: {self.end_note}"

    def _iterate(self, handle: _Handle) -> Iterator[RawFrame]:
        period = 1.0 / self.fps if self.fps else 0.0
        next_due: float | None = None
        clock_anchor: tuple[float, float] | None = None  # (pts, monotonic) for pacing
        count = 0
        resume_at = self._next_pts if self.kind == "file" else None
        to_bgr = BgrConverter()
        while True:
            first_pts = last_pts = None
            pending, handle.pending = handle.pending, []
            for frame in chain(pending, self._decode(handle)):
                count += 1
                if frame.time is not None:
                    pts = float(frame.time)
                elif handle.rate:  # a frame without pts (seen over RTSP): one frame after the last
                    pts = (count - 1) / handle.rate if last_pts is None else last_pts + 1 / handle.rate
                else:
                    pts = time.monotonic()
                if first_pts is None:
                    first_pts = pts
                    if resume_at is not None:  # reopened: carry on after the frames delivered before
                        self._pts_offset = resume_at - pts
                        resume_at = None
                last_pts = pts
                self._decoded_count = count
                frame_time = 1.0 / handle.rate if handle.rate else 0.0
                self._decoded_until = pts + frame_time
                pts += self._pts_offset
                if period:
                    if next_due is not None and pts < next_due - 1e-6:
                        continue
                    # Step the schedule in whole periods so the sampled rate stays exact over time.
                    next_due = pts + period if next_due is None else next_due + period
                    while next_due <= pts:
                        next_due += period
                if self.pace:
                    clock_anchor = self._wait_for(pts, clock_anchor)
                    if self._stop.is_set():
                        return
                image = to_bgr(frame)
                self._next_pts = pts + frame_time
                yield RawFrame(image, pts, time.monotonic())
            if not (self.loop and self.kind == "file") or first_pts is None or self._stop.is_set():
                return
            frame_time = 1.0 / handle.rate if handle.rate else 0.0
            self._pts_offset += last_pts - first_pts + frame_time
            handle.container.seek(0)
            log.debug("source %s: looping %s", self.id, self.url)

    def _decode(self, handle: _Handle) -> Iterator[av.VideoFrame]:
        for packet in handle.container.demux(handle.stream):
            if self._abandoned():  # stop(), or the watchdog gave up on this connection
                return
            try:
                yield from packet.decode()
            except av.error.InvalidDataError as exc:  # one bad packet; the next key frame recovers
                self.corrupt_packets += 1
                log.debug("source %s: skipped undecodable packet at pts %s: %s", self.id, packet.pts, exc)
                # A file says how many at its end; a live stream cannot wait for an end that may never come.
                if self.live:
                    self._corrupt_log.warning(
                        "corrupt", "source %s: skipping corrupt packets (%d so far)", self.id, self.corrupt_packets
                    )

    def _wait_for(self, pts: float, anchor: tuple[float, float] | None) -> tuple[float, float]:
        now = time.monotonic()
        if anchor is None:
            return pts, now
        due = anchor[1] + (pts - anchor[0])
        if due - now > 1.0 or now - due > 1.0:  # a jump in pts or a long stall: re-anchor, do not burst
            return pts, now
        if due > now:
            self._stop.wait(due - now)
        return anchor
