"""Events over HTTP: a bounded ring of recent events (GET /api/v1/events) and a WebSocket of live ones.

Both carry each event's ZeroMQ payload byte for byte (crops never: the ring keeps payloads only). The
ring is fed by the supervisor's tap on its own thread; each WebSocket gets a bounded asyncio queue, filled
with call_soon_threadsafe, and a client too slow to keep up loses events (its seq shows the gap) instead
of holding the pipeline back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import Response
from starlette.websockets import WebSocketDisconnect

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["events"])

SUBSCRIBER_QUEUE = 2_000


@dataclass(frozen=True)
class _Entry:
    seq: int
    kind: str
    stream: str
    name: str | None
    payload: bytes


def _kinds(kind: str | None) -> tuple[str, ...]:
    return tuple(k.strip() for k in (kind or "").split(",") if k.strip())


def _matches(entry: _Entry, kinds: tuple[str, ...], stream: str | None, name: str | None) -> bool:
    # "track" matches track.started/updated/ended; several kinds separated by commas.
    if kinds and not any(entry.kind == k or entry.kind.startswith(k + ".") for k in kinds):
        return False
    if stream and entry.stream != stream:
        return False
    return not name or entry.name == name


class _Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop, kinds: tuple[str, ...], stream: str | None) -> None:
        self.loop = loop
        self.kinds, self.stream = kinds, stream
        self.queue: asyncio.Queue[_Entry] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.dropped = 0

    def offer(self, entry: _Entry) -> None:
        if _matches(entry, self.kinds, self.stream, None):
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is going down
                self.loop.call_soon_threadsafe(self._put, entry)

    def _put(self, entry: _Entry) -> None:
        try:
            self.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1


class EventRing:
    def __init__(self, size: int) -> None:
        self._ring: deque[_Entry] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._subscribers: set[_Subscriber] = set()

    def add(self, event: Any) -> None:
        entry = _Entry(int(event.seq), event.kind, event.stream, getattr(event, "name", None), event.payload())
        with self._lock:
            self._ring.append(entry)
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.offer(entry)

    def query(self, kind: str | None = None, stream: str | None = None, name: str | None = None,
              after_seq: int | None = None, limit: int = 100) -> list[_Entry]:
        """Matching events in seq order: the first `limit` after `after_seq`, else the last `limit`."""
        kinds = _kinds(kind)
        with self._lock:
            entries = list(self._ring)
        found = [e for e in entries if (after_seq is None or e.seq > after_seq) and _matches(e, kinds, stream, name)]
        return found[:limit] if after_seq is not None else found[-limit:] if limit else []

    def subscribe(self, loop: asyncio.AbstractEventLoop, kind: str | None, stream: str | None) -> _Subscriber:
        subscriber = _Subscriber(loop, _kinds(kind), stream)
        with self._lock:
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)


def _events_json(entries: list[_Entry]) -> bytes:
    return b'{"events":[' + b",".join(e.payload for e in entries) + b"]}"


@router.get("/events", summary="recent events from the in-memory ring (payloads as on ZeroMQ)")
async def events(
    request: Request,
    kind: str | None = Query(None, description="event kind(s), comma-separated; a prefix such as track matches"
                                               " track.started/updated/ended"),
    stream: str | None = Query(None, description="stream id"),
    name: str | None = Query(None, description="identity events of this person"),
    after_seq: int | None = Query(None, ge=0, description="only events after this seq (oldest first)"),
    limit: int = Query(100, ge=1, le=1_000_000, description="most events returned"),
) -> Response:
    ring: EventRing = request.app.state.ctx.events
    return Response(_events_json(ring.query(kind, stream, name, after_seq, limit)), media_type="application/json")


@router.websocket("/events/ws")
async def events_ws(websocket: WebSocket, kind: str | None = None, stream: str | None = None,
                    after_seq: int | None = None) -> None:
    """One text message per event, the same JSON as on ZeroMQ; with after_seq, the ring's backlog first."""
    ctx = websocket.app.state.ctx
    ring: EventRing = ctx.events
    await websocket.accept()
    subscriber = ring.subscribe(asyncio.get_running_loop(), kind, stream)
    closed = asyncio.Event()

    async def watch_close() -> None:
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        closed.set()

    watcher = asyncio.create_task(watch_close())
    last = -1
    try:
        if after_seq is not None:
            for entry in ring.query(kind, stream, None, after_seq, 1_000_000):
                await websocket.send_text(entry.payload.decode())
                last = entry.seq
        while not closed.is_set() and not ctx.stopping.is_set():
            try:
                entry = await asyncio.wait_for(subscriber.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            if entry.seq <= last:
                continue  # already sent from the backlog
            await websocket.send_text(entry.payload.decode())
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        ring.unsubscribe(subscriber)
        watcher.cancel()
        if not closed.is_set():
            with contextlib.suppress(Exception):
                await websocket.close(1001 if ctx.stopping.is_set() else 1000)
        if subscriber.dropped:
            log.info("a WebSocket client was too slow and lost %d events", subscriber.dropped)
