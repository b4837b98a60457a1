"""Webhook sink: POST matching events as JSON to a URL (httpx), one worker thread per hook.

The body is the event's JSON payload, the same bytes a ZeroMQ subscriber gets. Events are delivered in
order; an attempt that fails on the network, times out or gets 408/429/5xx is retried with exponential
backoff (honouring a short Retry-After), up to `retries` times, then the event is given up and counted.
Other answers (4xx, 3xx) are not retried: the hook is misconfigured and a retry would not help.

Credentials: `https://user:password@host/...` in the URL (basic auth) or `headers: {Authorization: ...}`.
Neither is ever logged; log lines name the hook by scheme, host and port only (paths often hold a secret).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from streamer.config import WebhookSettings
from streamer.publish.sinks import QueuedSink

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
RETRYABLE_STATUS = frozenset({408, 425, 429})


def describe_url(url: str) -> str:
    """scheme://host[:port] of `url`: what log lines may say about a hook."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


class WebhookSink(QueuedSink):
    def __init__(self, settings: WebhookSettings, name: str = "webhook") -> None:
        import httpx

        from streamer import __version__
        from streamer.sockets import is_loopback

        super().__init__(name, settings.queue)
        self.settings = settings
        self.target = describe_url(settings.url)
        self.kinds = frozenset(settings.kinds)
        self.names = frozenset(settings.names)
        self.errors = 0  # failed attempts, retried or not
        self._httpx = httpx
        headers = {"content-type": "application/json", "user-agent": f"streamer/{__version__}"}
        headers.update({key: value.get_secret_value() for key, value in settings.headers.items()})
        # httpx turns user:password@ in the URL into basic auth; redirects are refused (they could carry the
        # credentials elsewhere), and answered as a failure.
        self._client = httpx.Client(timeout=settings.timeout_s, headers=headers, follow_redirects=False)
        parts = urlsplit(settings.url)
        host = parts.hostname or ""
        if parts.scheme == "http" and not is_loopback(f"tcp://[{host}]:1" if ":" in host else f"tcp://{host}:1"):
            log.warning("%s: %s is beyond this machine over plain http: events (names of the people seen) and "
                        "any credentials travel unencrypted; use https://", name, self.target)
        self.start()
        log.info("%s: posting %s events to %s", name, ", ".join(sorted(self.kinds)), self.target)

    def stats(self) -> dict[str, int]:
        stats = super().stats()
        stats["errors"] = self.errors
        return stats

    def _accepts(self, event: Any) -> bool:
        if event.kind not in self.kinds:
            return False
        return not self.names or event.kind != "identity" or event.name in self.names

    def _deliver(self, event: Any, crop: bytes | None) -> bool:
        httpx = self._httpx
        body = event.payload()
        delay = RETRY_MIN_S
        attempts = self.settings.retries + 1
        problem = ""
        for attempt in range(1, attempts + 1):
            wait = delay
            try:
                response = self._client.post(self.settings.url, content=body)
            except httpx.TransportError as exc:  # refused, unreachable, timed out, reset
                problem, retry = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, True
            except httpx.HTTPError as exc:
                problem, retry = f"{type(exc).__name__}: {exc}", False
            else:
                if response.is_success:
                    return True
                status = response.status_code
                problem = f"HTTP {status} {response.reason_phrase}".rstrip()
                retry = status >= 500 or status in RETRYABLE_STATUS
                wait = max(delay, _retry_after(response.headers.get("retry-after")))
            self.errors += 1
            if not retry or attempt == attempts:
                break
            if not self._sleep(min(wait, RETRY_MAX_S)):
                problem += " (streamer was stopping)"
                break
            delay = min(delay * 2, RETRY_MAX_S)
        self._log.warning("give-up", "%s: %s: an event (%s, seq %s) was not delivered after %d attempt%s: %s",
                          self.name, self.target, event.kind, event.seq, attempt, "s" if attempt > 1 else "", problem)
        return False

    def _finish(self) -> None:
        self._client.close()


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (the seconds form; a date is ignored), capped."""
    try:
        return min(max(float(value), 0.0), RETRY_MAX_S) if value else 0.0
    except ValueError:
        return 0.0
