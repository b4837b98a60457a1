"""What every route of the app shares: settings, the one FaceEngine, the token store, the supervisor."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from streamer.config import Settings
from streamer.serve.api_events import EventRing
from streamer.serve.auth import LoginLimiter, Sessions, TokenStore
from streamer.serve.errors import APIError
from streamer.serve.unknowns import UnknownStore

T = TypeVar("T")


@dataclass
class ServeContext:
    settings: Settings
    tokens: TokenStore
    engine: Any = None  # streamer.engine.FaceEngine; None = built from settings on first use
    supervisor: Any = None  # streamer.pipeline.run.Supervisor, or None (image and gallery routes only)
    # streamer.match.strangers.StrangerBook: the supervisor's own (supervisor.strangers) unless given.
    strangers: Any = None
    gallery_path: Any = None  # the gallery's location: a Path, or a PostgreSQL URL (SecretStr)
    sessions: Sessions = field(default_factory=Sessions)
    limiter: LoginLimiter | None = None
    events: EventRing | None = None
    unknowns: UnknownStore | None = None
    # Set when the server shuts down: long-lived responses (MJPEG, WebSocket) end at once.
    stopping: threading.Event = field(default_factory=threading.Event)
    # onnxruntime sessions of one engine are shared by every request: one call at a time.
    engine_lock: threading.Lock = field(default_factory=threading.Lock)
    gallery_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        serve = self.settings.serve
        if self.gallery_path is None:
            from streamer.match.open import location

            where = location(self.settings.gallery)  # a path, or a postgresql:// URL (SecretStr)
            self.gallery_path = Path(where) if isinstance(where, (str, Path)) else where
        if self.strangers is None and self.supervisor is not None:
            self.strangers = getattr(self.supervisor, "strangers", None)
        if self.limiter is None:
            self.limiter = LoginLimiter(serve.login_attempts_per_minute)
        if self.events is None:
            self.events = EventRing(serve.events_ring)
        if self.unknowns is None:
            self.unknowns = UnknownStore(serve.max_unknowns, serve.unknown_ttl_s)

    def face_engine(self) -> Any:
        if self.engine is None:
            from streamer.engine import FaceEngine

            self.engine = FaceEngine(self.settings)
        return self.engine

    async def with_engine(self, fn: Callable[[Any], T]) -> T:
        """`fn(engine)` on a worker thread, holding the engine lock (model inference blocks)."""

        def call() -> T:
            with self.engine_lock:
                return fn(self.face_engine())

        return await run_in_threadpool(call)

    def tap(self, sent: Any, crop: bytes | None) -> None:
        """The supervisor's tap: called on its thread for every published event; only enqueues."""
        assert self.events is not None and self.unknowns is not None
        self.events.add(sent)
        self.unknowns.observe(sent, crop)

    def require_supervisor(self) -> Any:
        if self.supervisor is None:
            raise APIError(503, "no pipeline runs in this server (start it with `streamer serve`)")
        return self.supervisor

    def require_strangers(self) -> Any:
        if self.strangers is None:
            raise APIError(503, "no pipeline runs in this server, so there are no strangers (start it with "
                                "`streamer serve`)")
        return self.strangers

    def require_gallery(self) -> Any:
        if self.gallery_path is None:
            raise APIError(
                409, "this server has no gallery: start it with --gallery FILE or a postgresql:// URL (or set "
                "gallery.path or gallery.url)"
            )
        return self.gallery_path
