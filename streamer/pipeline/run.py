"""The supervisor: starts the two workers, owns the public PUB socket, restarts crashed workers.

    supervisor (this process)      -- PUB tcp://127.0.0.1:5556 --> subscribers
        |  ^ events (PULL, ipc)
        v  |
    detect worker x N  <-- DEALER/ROUTER (ipc or tcp) -->  inference worker

`pipeline.detect_workers` detect workers each hold a shard of the streams (`streamer.pipeline.pool`); all
share the inference worker, whose batches fill across every stream. Each has its own commands channel; a
crashed one is restarted with its own shard, the others go on.

The supervisor stamps `seq` on every event, so a restarted worker never makes subscribers see seq
start over. For `streamer serve` it also takes calls from other threads (the HTTP server's): taps on
every published event, streams added and removed at run time, and live tiles of the streams someone
watches (`supervisor.frames`, a `live.FrameHub`); what must reach the detect worker goes on a commands
channel (PUSH -> PULL), sent from the supervisor's own thread, since ZeroMQ sockets are not thread-safe.
 SIGINT/SIGTERM become a graceful drain: the detect worker finishes in-flight inference,
ends every track, publishes the final stream status, and everything exits 0.

Inference going down or coming back (the detect worker's `pipeline.status` events) is published once per
change, whichever detect worker saw it, and said on stderr with what to check. A run in which recognition
never worked although faces needed it ends with exit code 1 and one line saying why.
Killed with SIGKILL, the supervisor cleans up nothing; its workers notice and remove its temporary
folder themselves (`worker_base.OrphanGuard`); a folder that outlived every process (all killed at once)
is removed by the next supervisor to start (`sweep_stale_folders`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from streamer.config import Settings, SourceSettings
from streamer.errors import ConfigError, InputError, SourceError, StreamerError
from streamer.logutil import RateLimitedLog
from streamer.sockets import SocketDefaults, SocketKind, make_socket

if TYPE_CHECKING:
    from streamer.pipeline.live import StreamView

log = logging.getLogger(__name__)

MAX_RESTARTS = 5  # within RESTART_WINDOW_S; beyond that the failure is not transient
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 20.0
OWNER_FILE = "owner"  # in the temporary folder: "<pid> <start time>" of the supervisor that made it
MAX_SOURCES = 256  # as settings.sources: each source is a decoder thread and its buffers
WATCH_RENEW_S = 1.0  # a watched stream's Watch is sent again this often...
WATCH_TTL_S = 5.0  # ...and lapses in the worker this long after the last one


class PipelineFailed(StreamerError):
    exit_code = 1


@dataclass
class RunSummary:
    published: int = 0
    dropped: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=100_000))
    latencies_by_kind: dict[str, list[float]] = field(default_factory=dict)
    frames: int = 0
    faces_sent: int = 0
    faces_embedded: int = 0  # faces whose results came back
    faces_dropped: int = 0  # faces never sent to inference (link full, inference down)
    first_frame_at: float | None = None  # time.monotonic() of the first frame read
    last_published_at: float | None = None  # of the last event other than a heartbeat
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    restarts: dict[str, int] = field(default_factory=lambda: {"detect": 0, "inference": 0})
    last_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class _Worker:
    """A worker process; `args` is called at each start (a restarted worker gets current arguments)."""

    def __init__(self, name: str, target: Any, args: Callable[[], tuple],
                 clock: Callable[[], float] = time.monotonic, kind: str | None = None) -> None:
        self.name, self.target, self.args = name, target, args
        self.kind = kind or name  # "detect" for every worker of the pool ("detect-1"...)
        self.clock = clock
        self.process: multiprocessing.process.BaseProcess | None = None
        self.crashes: deque[float] = deque()

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: onnxruntime/MediaPipe threads don't survive it
        self.process = context.Process(target=self.target, args=self.args(), name=f"streamer-{self.name}", daemon=True)
        self.process.start()
        log.info("started %s worker (pid %d)", self.name, self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return None if self.process is None else self.process.exitcode

    def signal(self, signum: int) -> None:
        if self.alive and self.process is not None and self.process.pid:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def join(self, timeout: float) -> None:
        if self.process is None:
            return
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)

    def may_restart(self) -> bool:
        """Records a crash; False once there were more than MAX_RESTARTS within RESTART_WINDOW_S."""
        now = self.clock()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > RESTART_WINDOW_S:
            self.crashes.popleft()
        return len(self.crashes) <= MAX_RESTARTS


@dataclass
class _LiveTrack:
    box: tuple[float, float, float, float]
    frame: int
    pts: float
    started_pts: float


class TrackBook:
    """The supervisor's view of every live track, from the events it publishes: what it needs to end
    them when the worker that held them dies, and where a restarted worker's ids must start."""

    def __init__(self) -> None:
        self._live: dict[str, dict[int, _LiveTrack]] = {}
        self._next: dict[str, int] = {}

    def observe(self, event: Any) -> None:
        track = getattr(event, "track", None)
        if track is None:
            return
        live = self._live.setdefault(event.stream, {})
        self._next[event.stream] = max(self._next.get(event.stream, 1), track + 1)
        if event.kind == "track.ended":
            live.pop(track, None)
        elif event.kind == "track.started":
            live[track] = _LiveTrack(event.box, event.frame, event.pts, event.pts)
        elif track in live:
            old = live[track]
            live[track] = _LiveTrack(event.box, max(old.frame, event.frame), max(old.pts, event.pts), old.started_pts)

    def reported(self, stream: str, next_track_id: int) -> None:
        """A worker's own counter: ids it handed out to tracks not yet published are used up too."""
        self._next[stream] = max(self._next.get(stream, 1), next_track_id)

    def next_ids(self) -> dict[str, int]:
        return dict(self._next)

    def orphaned(self, streams: Any = None) -> list[Any]:
        """`track.ended` (reason worker_restart) for every live track (of `streams`, when given: the shard
        of the worker that died); forgets them."""
        from streamer.publish.events import TrackEnded

        ended = []
        for stream, tracks in self._live.items():
            if streams is not None and stream not in streams:
                continue
            for track, info in sorted(tracks.items()):
                ended.append(TrackEnded(stream=stream, frame=info.frame, pts=info.pts, track=track, box=info.box,
                                        duration=max(0.0, info.pts - info.started_pts), frames=None,
                                        reason="worker_restart"))
            tracks.clear()
        return ended


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        progress: bool = False,
        print_events: bool = False,
        log_level: int | None = None,
        stop_on_status: frozenset[str] = frozenset(),
        keep_running: bool = False,
    ) -> None:
        """`keep_running` (`streamer serve`): the pipeline idles without sources, waiting for some to be
        added, instead of ending when the last one ends."""
        from streamer.models.factory import ModelFactory
        from streamer.pipeline.live import FrameHub
        from streamer.publish.publisher import EventPublisher

        self.settings = settings
        self.summary = RunSummary()
        self.stopping = False
        self.fatal: str | None = None
        self.progress = progress
        self.print_events = print_events
        self.stop_on_status = stop_on_status  # e.g. {"lost"}: the bench replays a clip once as a camera
        self.keep_running = keep_running
        # What other threads may touch (streamer serve): the sources, the latest stream numbers, the taps.
        self._lock = threading.Lock()
        self._sources: dict[str, SourceSettings] = {}
        for index, source in enumerate(settings.sources):
            stream = source.id or f"cam{index}"
            if stream in self._sources:
                raise ConfigError(f"sources: stream id {stream!r} is used twice: give each source its own id")
            self._sources[stream] = source.model_copy(update={"id": stream})
        self._stream_stats: dict[str, Any] = {}  # stream -> StreamStats, from the detect worker's last stats
        self._stream_status: dict[str, tuple[str, str]] = {}  # stream -> (status, detail) last published
        self._taps: tuple[Callable[[Any, bytes | None], None], ...] = ()
        self._crops = False  # a tap wants face crops
        self._outbox: deque[Any] = deque()  # commands for the detect workers, routed on the supervisor thread
        self._watch_sent: dict[str, float] = {}  # stream -> when its Watch was last sent
        self.frames = FrameHub()
        self.log_level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
        # Every model the run needs resolves now: a missing one is one line before anything is spawned.
        ModelFactory(settings).resolve_all(heads=settings.inference.endpoint is None)
        from streamer.match.strangers import StrangerBook

        # Stranger ids (u-17): this process sees every identity event of every stream, so one book here
        # clusters unknown tracks across all of them. A strangers file of another embedder fails here.
        self.strangers = StrangerBook.from_settings(settings.recognition, ModelFactory(settings).embedder_spec)
        self.admin = None  # the local admin channel (`gallery promote`), made last: it starts a thread
        sweep_stale_folders()
        self._tmp = tempfile.TemporaryDirectory(prefix="streamer-")
        started = _process_start_time(os.getpid())
        if started is not None:
            (Path(self._tmp.name) / OWNER_FILE).write_text(f"{os.getpid()} {started}\n")
        self.context = zmq.Context.instance()
        # Bind the public socket first: a port in use fails here, before any worker starts.
        self.publisher = EventPublisher(
            settings.publish.endpoint,
            settings.publish.sndhwm,
            include_crops=settings.publish.include_crops,
            include_embeddings=settings.publish.include_embeddings,
            keys=_server_keys(settings.publish.keys, "publish.keys"),
        )
        from streamer.publish.sinks import Sinks

        self.sinks = Sinks.from_settings(settings)  # MQTT, webhooks: each only when configured
        from streamer.pipeline.metrics import MetricsServer, PipelineMetrics

        self.metrics = PipelineMetrics()
        self.metrics.sinks = self.sinks.stats
        self.metrics_server = None
        if settings.metrics.bind is not None:
            token = settings.metrics.token
            self.metrics_server = MetricsServer(self.metrics, *settings.metrics.host_port,
                                                token=None if token is None else token.get_secret_value())
        self.events_endpoint = f"ipc://{self._tmp.name}/events"
        self.control_endpoint = f"ipc://{self._tmp.name}/control"
        self.inference_endpoint = settings.inference.endpoint or f"ipc://{self._tmp.name}/inference"
        self.events = make_socket(self.context, SocketKind.PULL, hwm=SocketDefaults.EVENT_HWM,
                                  bind=self.events_endpoint, max_message_bytes=SocketDefaults.MAX_MESSAGE_BYTES)
        self.control = make_socket(self.context, SocketKind.PULL, hwm=SocketDefaults.EVENT_HWM,
                                   bind=self.control_endpoint, max_message_bytes=1 << 20)
        from streamer.pipeline.detect_worker import LIVE_HWM
        from streamer.pipeline.messages import MAX_LIVE_FRAME_BYTES
        from streamer.pipeline.pool import (
            PoolStats,
            StatusVotes,
            detect_worker_count,
            shard,
        )

        count = detect_worker_count(settings.pipeline.detect_workers, len(self._sources),
                                    keep_running=keep_running, preview=settings.output.preview)
        # Stream -> the index of the detect worker that holds it (only the supervisor thread changes it).
        self._holder = {stream: index for index, streams in enumerate(shard(self._sources, count))
                        for stream in streams}
        self.commands_endpoint = f"ipc://{self._tmp.name}/commands"
        self.frames_endpoint = f"ipc://{self._tmp.name}/frames"
        # One commands channel per detect worker: a PUSH to several would deal commands round robin.
        self.commands_endpoints = [self.commands_endpoint] + [f"{self.commands_endpoint}-{i}" for i in range(1, count)]
        self.commands_sockets = [make_socket(self.context, SocketKind.PUSH, hwm=SocketDefaults.EVENT_HWM, bind=e)
                                 for e in self.commands_endpoints]
        self.commands = self.commands_sockets[0]
        self._pending: list[deque[Any]] = [deque() for _ in range(count)]  # routed, not sent yet
        self.pool_stats = PoolStats(count, os.getpid())
        self._inference_votes = StatusVotes("up", "down")
        self._gallery_votes = StatusVotes("ok", "stale")
        self._pid_index: dict[int, int] = {}  # detect worker pid (current and past) -> its index
        self._connected: set[str] = set()  # streams that ever connected (the pool's exit_if_none_connect)
        self._first_failure: dict[str, str] = {}
        self.frames_socket = make_socket(self.context, SocketKind.PULL, hwm=LIVE_HWM, bind=self.frames_endpoint,
                                         max_message_bytes=MAX_LIVE_FRAME_BYTES + (64 << 10))
        self.tracks = TrackBook()
        from streamer.pipeline.report import RunReport

        self.report = RunReport()
        self._announced = False
        self._log = RateLimitedLog(log)
        settings_data = settings.model_dump(mode="json")
        from streamer.pipeline.detect_worker import detect_main
        from streamer.pipeline.inference_worker import inference_main

        self.inference = None
        if settings.inference.endpoint is None:  # else a remote worker serves us
            self.inference = _Worker(
                "inference", inference_main,
                lambda: (settings_data, self.inference_endpoint, self.control_endpoint, self.log_level,
                         self._tmp.name),
            )
        self._settings_data = settings_data
        # A restarted worker gets its shard's sources of today. One worker keeps today's name, "detect".
        self.detects = [
            _Worker("detect" if count == 1 else f"detect-{index}", detect_main,
                    lambda index=index: self._detect_args(index), kind="detect")
            for index in range(count)
        ]
        self._finished: set[int] = set()  # detect workers that ended by themselves (their input ended)
        self._last_heartbeat = time.monotonic()
        self._bars: dict[str, Any] = {}
        # What subscribers were last told about inference ("up" until told otherwise), and whether it ever worked.
        self._inference_ever_up = False
        # (state, detail) of the last pipeline.status about inference. Every change the worker sees comes as
        # one, in order on the events channel; stats travel on the control channel and may lag it, so the
        # heartbeat takes the state from here once there is one.
        self._inference: tuple[str, str] | None = None
        from streamer.match.open import location

        if location(settings.gallery) is not None:  # `gallery promote u-17 NAME --gallery PATH|URL` finds us by it
            from streamer.pipeline.admin import AdminServer

            self.admin = AdminServer(self.strangers, self._tmp.name, location(settings.gallery), context=self.context)

    # -- public ----------------------------------------------------------------------------------------
    @property
    def detect(self) -> _Worker:
        """The first detect worker (the only one unless pipeline.detect_workers says otherwise)."""
        return self.detects[0]

    def add_tap(self, fn: Callable[[Any, bytes | None], None], wants_crops: bool = False) -> None:
        """`fn(sent_event, crop)` for every published event (heartbeats too), on the supervisor thread, with
        the event as published (seq stamped) and, for identity events when crops are made, the face JPEG.
        It must be quick (enqueue, return); an exception in it is logged, never stops the run.
        `wants_crops`: make crops for this tap although they are not published (the public socket, MQTT and
        webhooks still get them only under publish.include_crops). Any thread; best before run()."""
        with self._lock:
            self._taps = (*self._taps, fn)
            if wants_crops and not self._crops:
                from streamer.pipeline.messages import SetCrops

                self._crops = True
                self._outbox.append(SetCrops(on=True))  # a worker already running; a new one is told at start

    def streams(self) -> list[StreamView]:
        """Every current source, as of the detect worker's last numbers (any thread)."""
        from streamer.pipeline.live import StreamView, redact_url

        with self._lock:
            sources = list(self._sources.items())
            stats = dict(self._stream_stats)
            statuses = dict(self._stream_status)
        views = []
        for stream, source in sources:
            info = stats.get(stream)
            status, detail = statuses.get(stream, ("connecting", ""))
            views.append(StreamView(
                id=stream, url=redact_url(source.url), status=status,  # type: ignore[arg-type]
                fps=info.fps if info else 0.0, frames=info.frames if info else 0,
                dropped=info.dropped if info else 0, reconnects=info.reconnects if info else 0,
                live=_is_live(source), detail=detail,
            ))
        return views

    def add_source(self, source: SourceSettings | dict[str, Any]) -> str:
        """Start a stream at run time (any thread); its id (the one given, else the first free camN).
        InputError for a bad source, an id in use or too many sources."""
        from pydantic import ValidationError

        from streamer.pipeline.messages import AddSource
        from streamer.sources import parse_url

        if not isinstance(source, SourceSettings):
            try:
                source = SourceSettings.model_validate(source)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"]) or "source"
                raise InputError(f"{where}: {error['msg']}") from None
        try:
            parsed = parse_url(source.url)
        except SourceError as exc:
            raise InputError(str(exc)) from None
        if parsed.kind == "file" and not Path(parsed.target).is_file():
            raise InputError(f"source {source.url!r}: no such video file here (give a path on the machine "
                             "streamer runs on, or an rtsp:// or http:// URL)")
        with self._lock:
            if len(self._sources) >= MAX_SOURCES:
                raise InputError(f"{MAX_SOURCES} sources at most: remove one before adding another")
            stream = source.id or next(f"cam{n}" for n in range(len(self._sources) + 1)
                                       if f"cam{n}" not in self._sources)
            if stream in self._sources:
                raise InputError(f"stream id {stream!r} is in use: choose another id or remove that stream first")
            source = source.model_copy(update={"id": stream})
            self._sources[stream] = source
            self._stream_status.pop(stream, None)
            self._outbox.append(AddSource(source=source))
        log.info("source %s added: %s", stream, _redacted(source.url))
        return stream

    def remove_source(self, stream_id: str) -> None:
        """Stop a stream at run time (any thread): its tracks end and it publishes stream.status ended.
        InputError when there is no such stream."""
        from streamer.pipeline.messages import RemoveSource

        with self._lock:
            if stream_id not in self._sources:
                known = ", ".join(sorted(self._sources)) or "none"
                raise InputError(f"no stream {stream_id!r} (streams: {known})")
            del self._sources[stream_id]
            self._stream_stats.pop(stream_id, None)
            self._stream_status.pop(stream_id, None)
            self._outbox.append(RemoveSource(stream=stream_id))
        self.frames.forget(stream_id)
        log.info("source %s removed", stream_id)

    def request_stop(self, *_: object) -> None:
        if not self.stopping:
            self.stopping = True
            for worker in self.detects:
                worker.signal(signal.SIGTERM)

    def run(self) -> RunSummary:
        if self.inference is not None:
            self.inference.start()
        for worker in self.detects:
            self._start_detect(worker)
        stop_deadline: float | None = None
        try:
            while True:
                self._pump(timeout_ms=50)
                self._send_commands()
                self.metrics.set_processes(self._pids())
                self._maybe_heartbeat()
                if self.fatal:
                    raise StreamerError(self.fatal)
                if self.stopping and stop_deadline is None:
                    stop_deadline = time.monotonic() + STOP_GRACE_S
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    log.error("detect worker did not stop in %.0f s; killing it", STOP_GRACE_S)
                    for worker in self.detects:
                        worker.join(0)
                for index, worker in enumerate(self.detects):
                    if index in self._finished or worker.alive:
                        continue
                    code = worker.exitcode
                    self._pump(timeout_ms=200, until_idle=True)
                    if self.fatal:
                        raise StreamerError(self.fatal)
                    if code == 0 or self.stopping:
                        self._finished.add(index)
                        self._inference_votes.forget(index)
                        self._gallery_votes.forget(index)
                    else:
                        self._restart(worker, code)
                if len(self._finished) == len(self.detects):
                    break
                self._check_reachable()
                if self.inference is not None and not self.inference.alive and not self.stopping:
                    self._pump(timeout_ms=200, until_idle=True)
                    if self.fatal:
                        raise StreamerError(self.fatal)
                    self._restart(self.inference, self.inference.exitcode)
            self._publish_heartbeat()
            return self.summary
        finally:
            self.summary.finished = time.monotonic()
            for worker in self.detects:
                worker.join(5)
            if self.inference is not None:
                self.inference.signal(signal.SIGTERM)
                self.inference.join(5)
            for bar in self._bars.values():
                bar.close()
            self.frames.close()
            self.events.close()
            self.control.close()
            for socket in self.commands_sockets:
                socket.close()
            self.frames_socket.close()
            self.publisher.close()
            self.sinks.close()  # bounded (2 s in all): MQTT says "offline" on the way out
            if self.metrics_server is not None:
                self.metrics_server.close()
            if self.admin is not None:
                self.admin.close()
            self.strangers.close()
            self._tmp.cleanup()

    # -- internals ------------------------------------------------------------------------------------------
    def _restart(self, worker: _Worker, code: int | None) -> None:
        log.error("%s worker exited unexpectedly (exit code %s); restarting it", worker.name, code)
        self.metrics.restarts[worker.kind] = self.metrics.restarts.get(worker.kind, 0) + 1
        if not worker.may_restart():
            raise PipelineFailed(f"{worker.name} worker keeps crashing (exit code {code}); giving up")
        if worker.kind == "detect":
            index = self.detects.index(worker)
            held = self._held(index)
            # Its tracks died with it: end them, so no subscriber waits for a track.ended that never comes.
            # Only its own: the other workers' streams go on.
            for event in self.tracks.orphaned(held if len(self.detects) > 1 else None):
                self._publish(event)
            from streamer.publish.events import StreamStatus

            for stream in self.summary.last_stats.get("streams", {}):
                if len(self.detects) == 1 or stream in held:
                    self._publish(StreamStatus(stream=stream, status="lost",
                                               detail=f"detect worker crashed (exit code {code}); restarting"))
            self._inference_votes.forget(index)  # the new process knows nothing yet
            self._gallery_votes.forget(index)
            self.pool_stats.forget_streams(index)
            self._pending[index].clear()  # what it was to be told is in its arguments now
            for stream in [s for s in self._watch_sent if s in held]:
                del self._watch_sent[stream]  # the new worker watches nothing yet: tell it at once
        self.summary.restarts[worker.kind] += 1
        if worker.kind == "detect":
            self._start_detect(worker)
        else:
            worker.start()

    def _start_detect(self, worker: _Worker) -> None:
        worker.start()
        if worker.process is not None and worker.process.pid:
            self._pid_index[worker.process.pid] = self.detects.index(worker)

    def _held(self, index: int) -> set[str]:
        return {stream for stream, holder in self._holder.items() if holder == index}

    def _check_reachable(self) -> None:
        """Several detect workers: not one source of the run connecting is a wrong address (as the one
        worker decides it alone: `slot.check_reachable`), not one worker's shard."""
        if (len(self.detects) == 1 or self.keep_running or not self.settings.reconnect.exit_if_none_connect
                or self._connected):
            return
        with self._lock:
            sources = dict(self._sources)
        if not sources or not all(stream in self._first_failure for stream in sources):
            return
        reasons = "; ".join(f"{stream} ({source.url}): {self._first_failure[stream]}"
                            for stream, source in sources.items())
        self.request_stop()  # the workers are still retrying: let them go now, not after the join's wait
        raise SourceError(f"cannot connect to any source: {reasons} "
                          "(set reconnect.exit_if_none_connect=false to keep retrying)")

    def _pump(self, timeout_ms: int, until_idle: bool = False) -> None:
        from streamer.pipeline.messages import parse_control, parse_event_frames

        poller = zmq.Poller()
        poller.register(self.events, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.frames_socket, zmq.POLLIN)
        while ready := dict(poller.poll(timeout_ms)):
            if self.frames_socket in ready:
                self._receive_frames()
            if self.control in ready:
                for frames in _drain(self.control):
                    try:
                        self._handle_control(parse_control(frames))
                    except ValueError as exc:
                        self._log.warning("control", "dropping an invalid control message: %s", _first_line(exc))
            if self.events in ready:
                for frames in _drain(self.events):
                    try:
                        event, meta, crop = parse_event_frames(frames)
                    except ValueError as exc:  # a bug, not a user error: say what was malformed
                        self._log.warning("event", "dropping an invalid event: %s", _first_line(exc))
                        continue
                    index = self._pid_index.get(meta.pid or -1, 0)
                    if (event.kind == "pipeline.status" and event.inference is not None
                            and not self._inference_changed(event, index)):
                        continue
                    if (event.kind == "pipeline.status" and event.gallery is not None
                            and not self._gallery_changed(event, index)):
                        continue
                    self._publish(event, crop, meta.decoded_at)
            if not until_idle:
                return

    def _handle_control(self, message: Any) -> None:
        if message.type == "fatal":
            self.fatal = message.message
            return
        if message.worker == "detect" and len(self.detects) > 1:
            # The pool's numbers as one worker's: streams side by side, totals summed across restarts.
            merged = self.pool_stats.observe(self._pid_index.get(message.pid or -1, 0), message)
            if merged is None:
                return  # late news from a process that was replaced
            message = merged
        self.metrics.observe_stats(message, message.pid)
        if message.worker != "detect":
            return  # only the detect workers' numbers make the heartbeat and the summary
        stats = message.model_dump()
        self.summary.last_stats = stats
        self.summary.faces_sent = message.faces_sent
        self.summary.faces_embedded = message.faces_embedded
        self.summary.faces_dropped = message.faces_dropped
        self._inference_ever_up = self._inference_ever_up or message.inference_ever_up
        self.summary.first_frame_at = self.summary.first_frame_at or message.first_frame_at
        self.summary.frames = sum(s.frames for s in message.streams.values())
        with self._lock:
            self._stream_stats = {stream: info for stream, info in message.streams.items() if stream in self._sources}
        for stream, info in message.streams.items():
            self.tracks.reported(stream, info.next_track_id)
        self._update_progress(stats)

    def _detect_args(self, index: int = 0) -> tuple:
        from streamer.pipeline.messages import DetectOptions

        with self._lock:
            sources = [source.model_dump(mode="json") for stream, source in self._sources.items()
                       if self._holder.get(stream) == index]
            crops = self._crops
        pool = len(self.detects) > 1
        options = DetectOptions(commands_endpoint=self.commands_endpoints[index], frames_endpoint=self.frames_endpoint,
                                crops=crops, keep_running=self.keep_running,
                                stream_count=len(self.settings.sources) if pool else None)
        settings = dict(self._settings_data, sources=sources)
        if pool:  # whether no source at all connects is the supervisor's to say, not one shard's
            settings["reconnect"] = dict(settings["reconnect"], exit_if_none_connect=False)
        return (settings, self.inference_endpoint, self.events_endpoint,
                self.control_endpoint, self.tracks.next_ids(), self.log_level, self._tmp.name,
                options.model_dump())

    def _send_commands(self) -> None:
        """What other threads queued for the detect workers, and the watches of the streams someone watches.
        Each command goes to the worker it concerns: a new source to the one holding the fewest streams, a
        removal or a watch to the one holding the stream, crops to all. A command a worker cannot take yet
        (starting, restarting) stays queued; a restarted worker gets its current sources with its
        arguments, so a command lost with a dying one loses nothing."""
        from streamer.pipeline.messages import (
            AddSource,
            RemoveSource,
            SetCrops,
            Watch,
            command_frames,
        )
        from streamer.pipeline.pool import least_loaded

        while self._outbox:
            command = self._outbox.popleft()
            if isinstance(command, AddSource):  # ids of a stream added again go on where they were
                stream = command.source.id or ""
                first = self.tracks.next_ids().get(stream, 1)
                command = command.model_copy(update={"first_track_id": first})
                running = [i for i in range(len(self.detects)) if i not in self._finished] or [0]
                loads = {i: 0 for i in running}
                for holder in self._holder.values():
                    if holder in loads:
                        loads[holder] += 1
                index = self._holder[stream] = least_loaded(loads)
                self._pending[index].append(command)
            elif isinstance(command, RemoveSource):
                index = self._holder.pop(command.stream, None)
                if index is not None:
                    self._pending[index].append(command)
            elif isinstance(command, SetCrops):
                for pending in self._pending:
                    pending.append(command)
            else:  # raw frames (tests) and anything else: the first worker
                self._pending[0].append(command)
        for index, pending in enumerate(self._pending):
            while pending:
                command = pending[0]
                frames = command if isinstance(command, list) else command_frames(command)
                try:
                    self.commands_sockets[index].send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    break
                pending.popleft()
        now = time.monotonic()
        with self._lock:
            watched = self.frames.watched() & self._sources.keys()
        for stream in watched:
            due = now - self._watch_sent.get(stream, float("-inf")) >= WATCH_RENEW_S
            if due and self._command(Watch(stream=stream, ttl_s=WATCH_TTL_S)):
                self._watch_sent[stream] = now
        for stream in [s for s in self._watch_sent if s not in watched]:
            del self._watch_sent[stream]
            self._command(Watch(stream=stream, active=False))  # lost: it lapses in WATCH_TTL_S anyway

    def _command(self, command: Any) -> bool:
        """A Watch, straight to the worker holding its stream."""
        from streamer.pipeline.messages import command_frames

        index = self._holder.get(command.stream)
        if index is None:
            return False  # not routed yet (just added): the next round
        try:
            self.commands_sockets[index].send_multipart(command_frames(command), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _receive_frames(self) -> None:
        from streamer.pipeline.messages import parse_live_frame

        for frames in _drain(self.frames_socket):
            try:
                meta, jpeg = parse_live_frame(frames)
            except ValueError as exc:
                self._log.warning("frame", "dropping an invalid live frame: %s", _first_line(exc))
                continue
            with self._lock:
                known = meta.stream in self._sources
            if known:  # not one of a stream removed meanwhile
                self.frames.put(meta.stream, meta.frame, meta.pts, meta.decoded_at, meta.encoded_at, jpeg)

    def _pids(self) -> dict[str, int | None]:
        pids: dict[str, int | None] = {"supervisor": os.getpid()}
        for worker in (*self.detects, self.inference):
            if worker is not None and worker.process is not None:
                pids[worker.name] = worker.process.pid
        return pids

    def _inference_changed(self, event: Any, worker: int = 0) -> bool:
        """True for news (publish it and say it); False for what subscribers know already, e.g. a restarted
        detect worker finding inference down again, the first answer of a worker nobody missed, or a second
        detect worker of the pool seeing what the first one said (down while any of them says so)."""
        said = self._inference[0] if self._inference else "up"  # subscribers assume up until told otherwise
        state = self._inference_votes.vote(worker, event.inference)
        if state == event.inference:
            self._inference = (event.inference, event.detail)
        if event.inference == "up":
            self._inference_ever_up = True
        if state == said:
            return False
        if event.inference == "down":
            self._say(f"inference is down: {event.detail}; faces are not recognised until it is back "
                      f"({self._inference_remedy()})")
        else:
            self._say(f"inference is {event.detail or 'back'}: recognition resumed")  # "back after 3.1 s"
        return True

    def _gallery_changed(self, event: Any, worker: int) -> bool:
        """Every detect worker reads the gallery: a change is published once (stale while any says so)."""
        if len(self.detects) == 1:
            return True
        said = self._gallery_votes.state
        return self._gallery_votes.vote(worker, event.gallery) != said

    def _inference_remedy(self) -> str:
        endpoint = self.settings.inference.endpoint
        if endpoint is None:
            return "streamer restarts its local inference worker; run with -v to see why it stopped"
        return (f"check inference.endpoint / STREAMER_INFERENCE__ENDPOINT and that `streamer inference-worker` "
                f"runs at {endpoint}")

    def recognition_failure(self) -> str | None:
        """Why recognition never worked in this run although faces needed it; None when it worked (or
        was never needed, or was still starting when the run was stopped)."""
        needed = self.summary.faces_sent + self.summary.faces_dropped
        state = self.summary.last_stats.get("inference")
        if self._inference_ever_up or not needed or "down" not in (state, self._inference and self._inference[0]):
            return None
        detail = self.summary.last_stats.get("inference_detail") or (self._inference[1] if self._inference else "")
        return (f"{detail}; {needed} face{'s' if needed != 1 else ''} went unrecognised "
                f"({self._inference_remedy()})")

    def _say(self, line: str) -> None:
        """One line for the operator on stderr, never on the progress bar's line."""
        if self._bars:
            from tqdm import tqdm

            tqdm.write(f"streamer: {line}", file=sys.stderr)
        else:
            sys.stderr.write(f"streamer: {line}\n")
            sys.stderr.flush()

    def _publish(self, event: Any, crop: bytes | None = None, decoded_at: float | None = None) -> None:
        event = self.strangers.observe(event, crop)  # unknown identities get their stranger id (u-17)
        sent = self.publisher.publish(event, crop=crop)
        # Enqueues only: a sink never makes the pipeline wait. A crop made only for a tap stays in here.
        self.sinks.publish(sent, crop if self.publisher.include_crops else None)
        for tap in self._taps:
            try:
                tap(sent, crop)
            except Exception as exc:  # noqa: BLE001 - a tap's bug must not stop the pipeline
                self._log.warning(f"tap-{id(tap)}", "an event tap failed: %s", _first_line(exc))
        if event.kind == "stream.status":
            with self._lock:
                if event.stream in self._sources:
                    self._stream_status[event.stream] = (event.status, event.detail)
            if event.status in ("connected", "reconnected"):
                self._connected.add(event.stream)
            elif event.status == "lost":
                self._first_failure.setdefault(event.stream, event.detail)
        self.metrics.observe_event(sent)
        self.metrics.publish_dropped = self.publisher.dropped
        self.tracks.observe(event)
        self.report.observe(event)
        if (event.kind == "stream.status" and event.status in ("connected", "reconnected") and not self._announced
                and not (self.progress or self.print_events)):
            # Nothing else on the terminal says where the events go.
            self._announced = True
            sys.stderr.write(f"streamer: publishing events on {self.publisher.endpoint} "
                             f"(watch them with: streamer subscribe {self.publisher.endpoint})\n")
        if event.kind == "stream.status" and event.status in self.stop_on_status:
            self.request_stop()
        self.summary.published += 1
        now = time.monotonic()
        if event.kind != "heartbeat":
            self.summary.last_published_at = now
        if self.print_events:
            line = f"{sent.topic.decode()} {sent.payload().decode()}"
            if self._bars:  # never on the progress bar's line: tqdm clears it, prints, redraws
                from tqdm import tqdm

                tqdm.write(line, file=sys.stdout)
            else:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        if decoded_at is not None:
            latency = (now - decoded_at) * 1000
            self.summary.latencies_ms.append(latency)
            by_kind = self.summary.latencies_by_kind.setdefault(event.kind, [])
            if len(by_kind) < 100_000:
                by_kind.append(latency)

    def _maybe_heartbeat(self) -> None:
        if time.monotonic() - self._last_heartbeat >= self.settings.publish.heartbeat_s:
            self._publish_heartbeat()

    def _publish_heartbeat(self) -> None:
        from streamer.publish.events import Heartbeat

        self._last_heartbeat = time.monotonic()
        stats = self.summary.last_stats
        if not stats:
            return
        queues = dict(stats.get("queues", {}))
        queues["publish_dropped"] = self.publisher.dropped
        health = ("fps", "frames", "dropped", "status", "reconnects")
        self._publish(Heartbeat(
            streams={stream: {key: info[key] for key in health} for stream, info in stats.get("streams", {}).items()},
            queues=queues,
            uptime=round(time.monotonic() - self.summary.started, 3),
            inference=self._inference[0] if self._inference else stats.get("inference", "starting"),
            inference_detail=self._inference[1] if self._inference else stats.get("inference_detail", ""),
        ))

    def _update_progress(self, stats: dict[str, Any]) -> None:
        if not self.progress:
            return
        from tqdm import tqdm

        for stream, info in stats.get("streams", {}).items():
            total = info.get("total_frames")
            if not total:
                continue
            bar = self._bars.get(stream)
            if bar is None:
                bar = self._bars[stream] = tqdm(total=total, desc=stream, unit="frame", leave=True, file=sys.stderr)
            bar.update(max(0, info["frames"] - bar.n))


def sweep_stale_folders(parent: str | Path | None = None) -> list[Path]:
    """Remove the temporary folders of supervisors that are gone: `streamer-*` folders of this user that
    hold an owner file naming a process that no longer runs (Linux; elsewhere nothing is swept)."""
    from streamer.pipeline.worker_base import TEMP_PREFIX

    removed: list[Path] = []
    if _process_start_time(os.getpid()) is None:
        return removed
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            pid, started = (folder / OWNER_FILE).read_text().split()
            alive = _process_start_time(int(pid)) == started
        except (OSError, ValueError):
            continue  # not ours, or still being made
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d temporary folder(s) of streamer runs that were killed: %s", len(removed),
                 ", ".join(map(str, removed)))
    return removed


def _process_start_time(pid: int) -> str | None:
    """The start time of a running process (a pid can be reused; the pair cannot); None when it is gone,
    a zombie, or /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _drain(socket: zmq.Socket) -> list[list[bytes]]:
    messages = []
    while True:
        try:
            messages.append(socket.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return messages


def _is_live(source: SourceSettings) -> bool:
    from streamer.sources import parse_url

    if source.live is not None:
        return source.live
    try:
        return parse_url(source.url).live
    except SourceError:
        return False


def _redacted(url: str) -> str:
    from streamer.pipeline.live import redact_url

    return redact_url(url)


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _server_keys(directory: Any, setting: str) -> Any:
    if directory is None:
        return None
    from streamer.sockets import ServerKeys

    return ServerKeys.load(directory, setting)


def run_pipeline(settings: Settings, progress: bool = True, print_events: bool = False) -> int:
    """`streamer run`: returns the process exit code."""
    supervisor = Supervisor(settings, progress=progress and sys.stderr.isatty(), print_events=print_events)
    previous = {sig: signal.signal(sig, supervisor.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("published %d events in %.1f s", summary.published, summary.seconds)
    for line in supervisor.report.lines(summary.frames, summary.seconds, _output_files(settings)):
        sys.stderr.write(f"streamer: {line}\n")
    failure = supervisor.recognition_failure()
    if failure is not None:
        sys.stderr.write(f"streamer: error: recognition never worked: {failure}\n")
        return 1
    return 0


def _output_files(settings: Settings) -> list[Any]:
    if settings.output.path is None:
        return []
    from streamer.publish.output import AnnotatedOutput

    output = AnnotatedOutput(settings.output.model_copy(update={"preview": False}), len(settings.sources))
    return [output.path_for(source.id or f"cam{i}") for i, source in enumerate(settings.sources)]
