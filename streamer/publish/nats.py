"""NATS JetStream sink: every event, durably, on a cluster that late consumers replay from (nats-py).

Subjects (PREFIX is publish.nats.subject_prefix, "streamer" by default), all in the stream publish.nats.stream
("STREAMER", subjects PREFIX.>, file storage, kept max_age_s / max_bytes):

    PREFIX.<kind>.<stream>        the event's JSON, the same bytes as the ZeroMQ payload
    PREFIX.<kind>.<stream>.crop   the face JPEG, only when publish.include_crops is on

Every subject has the same depth, so `PREFIX.*.cam1` is one camera and `PREFIX.identity.*` one kind: a dot in
a kind becomes "_" (track.started -> track_started; a "_" in a kind would be escaped), events of no one
stream (heartbeat, pipeline.status: stream "*") have the token "_", and any other character a subject token
may not hold (wildcards * and >, dots, spaces, "%", non-ASCII) is %-escaped, so a hostile stream id can
neither add a wildcard nor collide with another id.

Exactly once, by seq: each message carries `Nats-Msg-Id: <publisher id>:<seq>`. An event whose ack did not
come (a timeout, no responders while a stream leader is elected, the connection lost) is published again with
the same id, and JetStream stores it once if the first copy got there (within duplicate_window_s). The
publisher id is new for every run (the supervisor builds its sinks once per run and seq restarts at 1 with
it): the host name, the pid and a random part, also sent as the header `Streamer-Publisher`.

Never stalls the pipeline: `publish` only appends to the bounded drop-oldest queue of QueuedSink; the sink's
thread publishes up to max_in_flight events at a time through an asyncio loop on a thread of its own (where
nats-py keeps the connection: pings, reconnects, acks) and waits for each PubAck.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from streamer.config import NatsSettings
from streamer.errors import ConfigError
from streamer.logutil import RateLimitedLog
from streamer.publish.events import ALL_STREAMS
from streamer.publish.sinks import QueuedSink

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.1  # backoff between resends while JetStream does not ack, doubling up to the max
RETRY_MAX_S = 2.0
RECONNECT_WAIT_S = 0.5  # between attempts on one server (nats-py tries the others in between)
CLOSE_RESERVE_S = 0.3  # of the stop budget, kept for closing the connection
NO_STREAM_TOKEN = "_"
_TOKEN_SAFE = "-_"  # with letters and digits; quote() also keeps "." and "~": dots are escaped below
BAD_STREAM_CONFIG_CODES = {
    10058: "a stream of that name exists with settings that cannot be changed (storage?): remove it "
           "(`nats stream rm`) or choose another publish.nats.stream",
    10065: "its subjects overlap with another stream's: choose another publish.nats.subject_prefix",
    10074: "the cluster has too few servers for publish.nats.replicas",
}
# Placement: JetStream reserves max_bytes on each of `replicas` servers when it makes the stream.
NO_ROOM = ("the cluster has too few servers with room for publish.nats.replicas copies of publish.nats.max_bytes: "
           "lower them, or give the servers more jetstream max_file_store")
BAD_STREAM_CONFIG_CODES.update(dict.fromkeys((10005, 10023, 10047), NO_ROOM))


# -- subjects -------------------------------------------------------------------------------------------------
def kind_token(kind: str) -> str:
    """track.started -> track_started; a "_" or anything else a token may not hold is %-escaped first."""
    return quote(kind, safe=_TOKEN_SAFE).replace("_", "%5F").replace("~", "%7E").replace(".", "_")


def stream_token(stream: str) -> str:
    """`stream` as one subject token (see the module docstring); the mapping is one to one."""
    if stream == ALL_STREAMS:
        return NO_STREAM_TOKEN
    if stream == NO_STREAM_TOKEN:
        return "%5F"
    return quote(stream, safe=_TOKEN_SAFE).replace(".", "%2E").replace("~", "%7E")


def subject_for(prefix: str, kind: str, stream: str) -> str:
    return f"{prefix}.{kind_token(kind)}.{stream_token(stream)}"


def topic_of(prefix: str, subject: str) -> bytes | None:
    """The ZeroMQ topic (`<kind>.<stream>`) an event subject stands for; None when it is no event subject."""
    if not subject.startswith(prefix + "."):
        return None
    tokens = subject[len(prefix) + 1:].split(".")
    if len(tokens) != 2 or not all(tokens):
        return None
    kind, stream = tokens
    stream = ALL_STREAMS if stream == NO_STREAM_TOKEN else unquote(stream, errors="strict")
    return f"{unquote(kind.replace('_', '.'), errors='strict')}.{stream}".encode()


def new_publisher_id() -> str:
    """host-pid-random: readable in `nats stream view`, and never the same in two runs (seq restarts at 1)."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-")[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def describe_server(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 4222}"


# -- connection options ---------------------------------------------------------------------------------------
def tls_context(ca_file: Any = None, cert_file: Any = None, key_file: Any = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    return context


def connect_options(settings: NatsSettings) -> dict[str, Any]:
    """nats.connect() keyword arguments for the credentials and TLS settings; ConfigError naming the setting."""
    options: dict[str, Any] = {}
    if settings.user is not None and settings.password is not None:
        options["user"] = settings.user
        options["password"] = settings.password.get_secret_value()
    if settings.token is not None:
        options["token"] = settings.token.get_secret_value()
    for setting, option in (("nkey_file", "nkeys_seed"), ("creds_file", "user_credentials")):
        path = getattr(settings, setting)
        if path is not None:
            import importlib.util

            if importlib.util.find_spec("nkeys") is None:
                raise ConfigError(f"publish.nats.{setting}: signing in with an nkey needs the nkeys package: "
                                  "pip install nkeys (or log in with publish.nats.user/password or token)")
            options[option] = str(path)
    if any(s.startswith("tls://") for s in settings.servers):
        try:
            options["tls"] = tls_context(settings.ca_file, settings.cert_file, settings.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"publish.nats.ca_file/cert_file/key_file: cannot load them: {exc}") from None
    return options


# -- the sink -------------------------------------------------------------------------------------------------
_OK, _RETRY, _FAIL = "ok", "retry", "fail"


class NatsSink(QueuedSink):
    def __init__(self, settings: NatsSettings, name: str = "nats", *, publisher_id: str | None = None,
                 on_ack: Callable[[Any, float], None] | None = None) -> None:
        """`on_ack(event, perf_counter_at_ack)` is called on the sink's thread for every acked event (benches)."""
        import nats
        import nats.errors
        import nats.js.errors

        options = connect_options(settings)
        super().__init__(name, settings.queue, tick_s=0.25)
        self.settings = settings
        self.prefix = settings.subject_prefix
        self.publisher_id = publisher_id or new_publisher_id()
        self.where = ", ".join(describe_server(s) for s in settings.servers)
        self.on_ack = on_ack
        self.connects = 0
        self.resent = 0  # events published again after no ack (timeout, no responders, connection lost)
        self.duplicates = 0  # acks saying JetStream had it already: a resend whose first copy had arrived
        self._nats = nats
        self._retryable = (
            nats.errors.TimeoutError, asyncio.TimeoutError, asyncio.CancelledError, nats.js.errors.NoStreamResponseError,
            nats.js.errors.ServiceUnavailableError, nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
            nats.errors.FlushTimeoutError, nats.errors.StaleConnectionError, nats.errors.NoRespondersError,
            ConnectionError,
        )
        self._api_error = nats.js.errors.APIError
        self._backoff = RETRY_MIN_S
        self._closing = False
        self._stream_ok = False
        self._stream_ready_logged = False
        self._ensuring: concurrent.futures.Future | None = None
        self._final_deadline = float("inf")
        self._net_log = RateLimitedLog(log)
        self._loop = asyncio.new_event_loop()
        self._io = threading.Thread(target=self._loop.run_forever, name=f"streamer-sink-{name}-io", daemon=True)
        self._nc = nats.NATS()
        self._js: Any = None
        self._io.start()
        # Connecting goes on in the background until it works: a cluster down at start never stops the pipeline.
        self._connecting = asyncio.run_coroutine_threadsafe(self._connect(options), self._loop)
        self.start()
        log.info("%s: publishing events to JetStream stream %s (subjects %s.>) on %s as publisher %s", name,
                 settings.stream, self.prefix, self.where, self.publisher_id)
        if not settings.loopback and not any(s.startswith("tls://") for s in settings.servers):
            log.warning("%s: %s is beyond this machine without TLS: events (names of the people seen) travel "
                        "unencrypted; use tls:// servers", name, self.where)

    def stats(self) -> dict[str, int]:
        stats = super().stats()
        stats["connected"] = int(self._nc.is_connected)
        stats["connects"] = self.connects
        stats["resent"] = self.resent
        stats["duplicates"] = self.duplicates
        return stats

    # -- the asyncio loop's thread --------------------------------------------------------------------------
    async def _connect(self, options: dict[str, Any]) -> None:
        settings = self.settings
        await self._nc.connect(
            servers=list(settings.servers), name=f"streamer {self.publisher_id}",
            connect_timeout=settings.connect_timeout_s, reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=-1, allow_reconnect=True, ping_interval=10, max_outstanding_pings=2,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
            **options,
        )
        self.connects += 1
        log.info("%s: connected to NATS %s", self.name, self._nc.connected_url.netloc if self._nc.connected_url else "")
        await self._ensure_stream()

    async def _on_error(self, error: Exception) -> None:
        if self._closing:
            return
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        remedy = " (check publish.nats.user/password, token or creds_file)" if "uthorization" in text else ""
        self._net_log.warning("error", "%s: NATS %s (publish.nats.servers): %s%s; retrying in the background, up "
                              "to %d events wait", self.name, self.where, text, remedy, self.maxsize)

    async def _on_disconnected(self) -> None:
        if not self._closing and self.connects:
            self._net_log.warning("lost", "%s: NATS connection lost; reconnecting, up to %d events wait", self.name,
                                  self.maxsize)

    async def _on_reconnected(self) -> None:
        self.connects += 1
        url = self._nc.connected_url
        log.warning("%s: connected to NATS again (%s)", self.name, url.netloc if url else "?")
        self._wake()

    async def _ensure_stream(self) -> None:
        """Create the stream, or bring its limits up to the settings; retried until it works (a cluster
        electing its leader answers nothing for a few seconds)."""
        from nats.js.api import (
            DiscardPolicy,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )

        settings = self.settings
        config = StreamConfig(
            name=settings.stream, subjects=[f"{self.prefix}.>"], storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD, max_age=settings.max_age_s,
            max_bytes=settings.max_bytes, num_replicas=settings.replicas, duplicate_window=settings.duplicate_window_s,
        )
        delay = RETRY_MIN_S
        while not self._closing:
            js = self._nc.jetstream(timeout=min(settings.publish_timeout_s, 5.0))
            try:
                try:
                    await js.add_stream(config)
                except self._api_error as exc:
                    if exc.err_code != 10058:  # exists with other settings: update those that may change
                        raise
                    await js.update_stream(config)
            except asyncio.CancelledError:  # the sink is closing
                raise
            except self._api_error as exc:
                if isinstance(exc, self._retryable):
                    why = str(exc)
                else:
                    why = BAD_STREAM_CONFIG_CODES.get(exc.err_code or 0, "")
                    why = f"{exc.description} ({why})" if why else str(exc.description or exc)
                    delay = max(delay, RETRY_MAX_S)
                self._net_log.warning("stream", "%s: cannot create or update stream %s: %s; retrying", self.name,
                                      settings.stream, why)
            except self._retryable as exc:
                if isinstance(exc, (self._nats.errors.NoRespondersError, self._nats.js.errors.NoStreamResponseError)):
                    self._net_log.warning("stream", "%s: NATS %s answers no JetStream requests: is JetStream "
                                          "enabled (nats-server -js) and its cluster up? Retrying", self.name, self.where)
            else:
                self._js = js
                self._stream_ok = True
                # Once at info; again (no responders while a stream leader is elected) at debug.
                log.log(logging.DEBUG if self._stream_ready_logged else logging.INFO,
                        "%s: stream %s ready (%s.>, %d replica%s)", self.name, settings.stream, self.prefix,
                        settings.replicas, "s" if settings.replicas > 1 else "")
                self._stream_ready_logged = True
                self._wake()
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _publish_batch(self, batch: list[tuple[Any, bytes | None]], timeout: float) -> list[Any]:
        return await asyncio.gather(*(self._publish_one(event, crop, timeout) for event, crop in batch),
                                    return_exceptions=True)

    async def _publish_one(self, event: Any, crop: bytes | None, timeout: float) -> tuple[bool, float]:
        subject = subject_for(self.prefix, event.kind, event.stream)
        msg_id = f"{self.publisher_id}:{event.seq}"
        ack = await self._js.publish(subject, event.payload(), timeout=timeout, stream=self.settings.stream,
                                     headers={"Nats-Msg-Id": msg_id, "Streamer-Publisher": self.publisher_id})
        acked_at = time.perf_counter()
        # The publisher stamps crop=True only when the user enabled crops: the one place that decides.
        if crop is not None and getattr(event, "crop", None) is True:
            await self._js.publish(f"{subject}.crop", crop, timeout=timeout, stream=self.settings.stream,
                                   headers={"Nats-Msg-Id": f"{msg_id}:crop", "Streamer-Publisher": self.publisher_id})
        return bool(ack.duplicate), acked_at

    # -- the sink's thread ----------------------------------------------------------------------------------
    def _ready(self) -> bool:
        return self._stream_ok and self._nc.is_connected

    def _take(self, n: int) -> list[tuple[Any, bytes | None]]:
        with self._cond:
            if self._stopping and time.monotonic() >= self._deadline:
                return []
            taken = []
            while self._items and len(taken) < n:
                taken.append(self._items.popleft())
            return taken

    def _deliver(self, event: Any, crop: bytes | None) -> bool | None:
        batch = [(event, crop), *self._take(self.settings.max_in_flight - 1)]
        timeout = self.settings.publish_timeout_s
        if self._stopping:
            timeout = max(0.05, min(timeout, self._deadline - time.monotonic()))
        future = asyncio.run_coroutine_threadsafe(self._publish_batch(batch, timeout), self._loop)
        results: list[Any] | None = None
        while results is None:
            try:
                results = future.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                if self._stopping and time.monotonic() >= self._deadline:  # the stop may not wait for acks
                    future.cancel()
                    with self._cond:
                        self.dropped += len(batch)
                    return None
        first: bool | None = None
        retry: list[tuple[Any, bytes | None]] = []
        for index, (item, result) in enumerate(zip(batch, results)):
            outcome = self._outcome(item[0], result)
            if outcome == _RETRY:
                retry.append(item)
                continue
            if outcome == _OK:
                duplicate, acked_at = result
                self.duplicates += duplicate
                if self.on_ack is not None:
                    self.on_ack(item[0], acked_at)
            if index == 0:
                first = outcome == _OK  # _run counts the first
            elif outcome == _OK:
                self.sent += 1
            else:
                self.failed += 1
        if not retry:
            self._backoff = RETRY_MIN_S
            return first
        self.resent += len(retry)
        for item in reversed(retry):  # in their order, before everything newer
            self._push_front(*item)
        self._sleep(self._backoff)
        self._backoff = min(self._backoff * 2, RETRY_MAX_S)
        return None if retry[0] is batch[0] else first

    def _outcome(self, event: Any, result: Any) -> str:
        if not isinstance(result, BaseException):
            return _OK
        if isinstance(result, self._retryable):
            if isinstance(result, (self._nats.js.errors.NoStreamResponseError, self._nats.errors.NoRespondersError)) \
                    and self._nc.is_connected:
                self._restore_stream()
            self._net_log.warning("retry", "%s: no ack for seq %s (%s); publishing it again", self.name, event.seq,
                               type(result).__name__)
            return _RETRY
        self._log.warning("fail", "%s: JetStream refused an event (%s, seq %s): %s", self.name, event.kind, event.seq,
                          result)
        return _FAIL

    def _restore_stream(self) -> None:
        """No responders for the subject: the stream is gone (deleted, or a cluster that lost its storage)."""
        if self._ensuring is not None and not self._ensuring.done():
            return
        self._stream_ok = False
        self._ensuring = asyncio.run_coroutine_threadsafe(self._ensure_stream(), self._loop)

    def begin_close(self, deadline: float) -> None:
        self._final_deadline = deadline
        now = time.monotonic()
        super().begin_close(deadline - min(CLOSE_RESERVE_S, max(0.0, deadline - now) / 2))

    def _finish(self) -> None:
        self._closing = True
        self._connecting.cancel()
        if self._ensuring is not None:
            self._ensuring.cancel()
        remaining = max(0.05, self._final_deadline - time.monotonic() - 0.05)
        if remaining == float("inf"):
            remaining = 1.0
        closing = asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop)
        try:
            closing.result(timeout=remaining)
        except Exception as exc:  # a stuck far end (a timeout) or a broken one: the loop goes anyway
            log.debug("%s: closing the connection: %s", self.name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._io.join(max(0.05, min(1.0, self._final_deadline - time.monotonic())))
        if not self._io.is_alive():
            self._loop.close()
