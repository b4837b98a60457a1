"""`streamer subscribe nats://HOST:PORT`: print events from the JetStream stream, live or replayed.

Prints the same `<topic> <json>` lines as the ZeroMQ subscriber. Without --since or --durable only new events
come (like ZeroMQ); `--since 10m` replays the stream from that time on; `--durable NAME` keeps a consumer on
the server that remembers what was printed: each message is acknowledged after it is printed, so the next
`streamer subscribe --durable NAME` resumes after the last one (a new durable starts at --since, or at the
stream's first event). Each message is validated as an event whose subject matches its payload: anything
else is skipped with a warning (and acknowledged, so it is not delivered again).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

from streamer.errors import InputError
from streamer.publish.events import KINDS, parse_event
from streamer.publish.nats import describe_server, kind_token, topic_of

log = logging.getLogger(__name__)

FETCH_BATCH = 256
FETCH_SLICE_S = 1.0  # a fetch waits this long at most, so --timeout and Ctrl-C are honoured
CONNECT_TIMEOUT_S = 5.0
# A JetStream API request times out while the stream's or the consumer's leader is being elected after a node
# went away (5 s and more on a loaded three-node cluster): such requests are tried again for this long.
API_RETRY_S = 20.0
API_TIMEOUT_S = 2.0  # each try: short, so a request to a leader that has just gone is soon asked again
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
MAX_SINCE_S = 366 * 86400.0


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "10m", "2h", "1d" or "1h30m"; ValueError with the form otherwise."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if not text or match is None:
            raise ValueError(f"expected a duration like 90s, 10m, 2h, 1d or 1h30m, got {text!r}") from None
        days, hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = days * 86400 + hours * 3600 + minutes * 60 + secs
    if not 0 < seconds <= MAX_SINCE_S:
        raise ValueError(f"expected a duration above 0 and at most 366 days, got {text!r}")
    return seconds


def is_nats_url(endpoint: str) -> bool:
    return endpoint.startswith(("nats://", "tls://"))


def print_nats_events(
    url: str,
    topic_prefixes: Iterable[str] = ("",),
    *,
    kinds: Iterable[str] = (),
    since_s: float | None = None,
    durable: str | None = None,
    stream: str = "STREAMER",
    out: TextIO | None = None,
    count: int | None = None,
    timeout: float | None = None,
) -> int:
    """Print events until `count` were printed or none came for `timeout` seconds; returns how many."""
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise InputError(f"subscribe: --kind {unknown[0]!r} is no event kind; kinds are {', '.join(KINDS)}")
    if durable is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", durable):
        raise InputError("subscribe: --durable: expected a name of letters, digits, _ and - (1-64 characters)")
    if count is not None and count < 0:
        raise ValueError(f"count: expected >= 0 or None, got {count}")
    out = sys.stdout if out is None else out
    prefixes = tuple(p.encode() for p in topic_prefixes) or (b"",)
    return asyncio.run(_print(url, prefixes, kinds, since_s, durable, stream, out, count, timeout))


async def _print(url: str, prefixes: tuple[bytes, ...], kinds: list[str], since_s: float | None,
                 durable: str | None, stream: str, out: TextIO, count: int | None, timeout: float | None) -> int:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    where = describe_server(url)
    nc = nats.NATS()

    refused: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_error(error: Exception) -> None:
        # Before the first connection an error is the answer (refused, unreachable, not authorised): say it
        # now rather than retry in silence. Later ones are reconnects, nats-py's business.
        if not refused.done() and not nc.is_connected:
            refused.set_result(error)
        log.debug("NATS %s: %s", where, error)

    connecting = asyncio.ensure_future(nc.connect(servers=[url], connect_timeout=2, max_reconnect_attempts=-1,
                                                  reconnect_time_wait=0.5, error_cb=on_error))
    await asyncio.wait({connecting, refused}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done() or connecting.exception() is not None:
        error = refused.result() if refused.done() else connecting.exception() if connecting.done() else None
        connecting.cancel()
        await nc.close()
        why = f"{type(error).__name__}: {error}" if error is not None else f"no answer within {CONNECT_TIMEOUT_S:g} s"
        raise InputError(f"subscribe: cannot connect to NATS {where} ({why}): is nats-server running there, and are "
                         "the credentials in the URL right?") from None

    async def retried(call: Callable[[], Awaitable[Any]], unanswered: str) -> Any:
        """`call()`'s answer (call makes the request anew each try), asked again while JetStream does not
        answer; InputError(`unanswered`) after API_RETRY_S. Other errors (not found, no responders) at once."""
        deadline = time.monotonic() + API_RETRY_S
        while True:
            try:
                return await call()
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                if time.monotonic() >= deadline:
                    raise InputError(f"subscribe: NATS {where} {unanswered}") from None
                log.debug("NATS %s: a JetStream request went unanswered; trying again", where)
                await asyncio.sleep(0.25)

    no_jetstream = "answers no JetStream requests: is JetStream enabled (nats-server -js) and its cluster up?"
    no_majority = f"for {API_RETRY_S:g} s: is a majority of the JetStream cluster up?"

    try:
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        try:
            info = await retried(lambda: js.stream_info(stream), no_jetstream)
        except nats.js.errors.NotFoundError:
            raise InputError(f"subscribe: NATS {where} has no stream {stream}: is `streamer run` publishing there "
                             "(publish.nats), or is it another --js-stream?") from None
        except nats.errors.NoRespondersError:
            raise InputError(f"subscribe: NATS {where} {no_jetstream}") from None
        subjects = info.config.subjects or []
        prefix = subjects[0][:-2] if len(subjects) == 1 and subjects[0].endswith(".>") else "streamer"
        filters = [f"{prefix}.{kind_token(kind)}.*" for kind in kinds] or [f"{prefix}.*.*"]  # not the crops
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT if durable else AckPolicy.NONE,
                                deliver_policy=DeliverPolicy.NEW, max_ack_pending=4 * FETCH_BATCH)
        if since_s is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.now(timezone.utc) - timedelta(seconds=since_s)
        elif durable is not None:
            config.deliver_policy = DeliverPolicy.ALL
        if len(filters) > 1:
            config.filter_subjects = filters
        else:
            config.filter_subject = filters[0]
        if durable is not None:
            try:
                existing = await retried(lambda: js.consumer_info(stream, durable),
                                         f"did not answer about durable consumer {durable} {no_majority}")
            except nats.js.errors.NotFoundError:
                existing = None
            if existing is not None:
                have = existing.config.filter_subjects or [existing.config.filter_subject]
                log.info("resuming durable consumer %s where it left off (%d not yet printed)%s", durable,
                         existing.num_pending, "; --since applies only when it is created" if since_s else "")
                if sorted(have) != sorted(filters):
                    raise InputError(f"subscribe: durable consumer {durable} takes {', '.join(map(str, have))}, not "
                                     f"{', '.join(filters)}: use the same --kind options, or another --durable name")
        else:
            config.inactive_threshold = 30.0  # the server forgets an ephemeral consumer whose reader went
        subscription = await retried(
            lambda: js.pull_subscribe(filters[0], durable=durable, stream=stream, config=config),
            f"did not make the consumer {no_majority}")
        return await _loop(subscription, prefix, prefixes, durable is not None, out, count, timeout)
    finally:
        try:
            await asyncio.wait_for(nc.close(), 2.0)
        except (asyncio.TimeoutError, nats.errors.Error):
            pass


async def _loop(subscription, prefix: str, prefixes: tuple[bytes, ...], ack: bool, out: TextIO,
                count: int | None, timeout: float | None) -> int:
    import nats.errors
    import nats.js.errors

    printed = invalid = 0
    last = time.monotonic()
    while count is None or printed < count:
        want = FETCH_BATCH if count is None else min(FETCH_BATCH, count - printed)
        wait = FETCH_SLICE_S if timeout is None else max(0.01, min(FETCH_SLICE_S, last + timeout - time.monotonic()))
        try:
            messages = await subscription.fetch(want, timeout=wait)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            messages = []
        except nats.js.errors.ServiceUnavailableError:  # a consumer just made, or one moving after a node went
            await asyncio.sleep(min(0.2, wait))
            messages = []
        if not messages:
            if timeout is not None and time.monotonic() - last >= timeout:
                break
            continue
        last = time.monotonic()
        for message in messages:
            line = _line(prefix, message.subject, message.data)
            if line is None:
                invalid += 1
            elif line.startswith(prefixes):
                out.write(line.decode(errors="replace") + "\n")
                out.flush()
                printed += 1
            if ack:  # after printing: a subscriber stopped in between gets that one again, never loses it
                await message.ack()
    if invalid:
        log.warning("%d invalid messages skipped", invalid)
    return printed


def _line(prefix: str, subject: str, payload: bytes) -> bytes | None:
    """`<topic> <json>` for a valid event whose subject says what its payload says, else None (logged)."""
    try:
        topic = topic_of(prefix, subject)
        if topic is None:
            raise ValueError(f"expected a subject {prefix}.<kind>.<stream>")
        parse_event(topic, payload)
    except ValueError as exc:  # pydantic's ValidationError and UnicodeDecodeError included
        log.warning("skipping invalid message on subject %r: %s", subject[:120],
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return topic + b" " + payload
