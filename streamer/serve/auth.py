"""Tokens, sessions and the failed-login limit for `streamer serve`.

The token store is a JSON file (mode 0600) holding only sha256 hashes of tokens, with an id, a name and the
creation time: a copy of the file lets nobody in. A token is shown once, when it is created. Browsers log in
with a token and get an opaque random session id in an HttpOnly cookie; the session maps to the token's id in
memory only, so revoking a token ends its sessions and a restart ends them all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from streamer.errors import ConfigError, InputError

log = logging.getLogger(__name__)

TOKEN_PREFIX = "stk_"  # recognisable in a leaked-secrets scan
STORE_SUFFIX = ".tokens.json"
SESSION_COOKIE = "streamer_session"
SESSION_TTL_S = 12 * 3600.0  # idle sessions end; a token logs in again


def store_path(settings: Any, config_file: str | Path | None = None) -> Path:
    """Where `streamer serve` and `streamer tokens` keep token hashes: serve.token_store, else beside the
    gallery file (<gallery>.tokens.json), else beside the config file, else ~/.config/streamer/.

    A PostgreSQL gallery (gallery.url) has no file to sit beside, and its tokens stay on this host: they
    authenticate this host's console, and a hash in a database shared by many hosts would let each in."""
    if settings.serve.token_store is not None:
        return Path(settings.serve.token_store)
    if settings.gallery.path is not None:
        gallery = Path(settings.gallery.path)
        return gallery.with_name(gallery.name + STORE_SUFFIX)
    if config_file is not None:
        return Path(config_file).expanduser().resolve().parent / f"streamer{STORE_SUFFIX}"
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "streamer" / f"streamer{STORE_SUFFIX}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    created: str  # ISO 8601, UTC
    hash: str  # sha256 hex of the token; never the token

    def public(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "created": self.created}


class TokenStore:
    """The token file; every call re-reads it when it changed, so `streamer tokens revoke` takes effect on a
    running server at its next request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: list[TokenRecord] = []
        self._stamp: tuple[int, int, int] | None = None

    # -- file ------------------------------------------------------------------------------------
    def _load(self) -> list[TokenRecord]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._records, self._stamp = [], None
            return self._records
        except OSError as exc:
            raise ConfigError(f"token store {self.path}: cannot read ({exc.strerror}); check serve.token_store")
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return self._records
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            records = [TokenRecord(str(r["id"]), str(r["name"]), str(r["created"]), str(r["hash"]))
                       for r in data["tokens"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"token store {self.path}: not a streamer token file ({type(exc).__name__}); move it away or "
                "point serve.token_store elsewhere"
            ) from None
        self._records, self._stamp = records, stamp
        return records

    def _save(self, records: list[TokenRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        body = json.dumps({"tokens": [r.__dict__ for r in records]}, indent=1).encode()
        try:
            # 0600 from the start: the hashes are not secrets, but nobody else needs them either.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"token store {self.path}: cannot write ({exc.strerror}); check serve.token_store")
        self._stamp = None  # re-read (and re-stat) on next use

    # -- operations ----------------------------------------------------------------------------------
    def records(self) -> list[TokenRecord]:
        with self._lock:
            return list(self._load())

    def __len__(self) -> int:
        return len(self.records())

    def create(self, name: str) -> tuple[TokenRecord, str]:
        """A new token named `name`; returns its record and the token itself (shown once, never stored)."""
        name = name.strip()
        if not name or len(name) > 100 or not name.isprintable():
            raise InputError("token name must be 1-100 printable characters, e.g. admin or kiosk")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(
            id=secrets.token_hex(4),
            name=name,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            hash=_digest(token),
        )
        with self._lock:
            records = list(self._load())
            records.append(record)
            self._save(records)
        log.info("created token %s (%s) in %s", record.id, record.name, self.path)
        return record, token

    def revoke(self, which: str) -> list[TokenRecord]:
        """Remove the token with id `which`, or every token named `which`; InputError when none matches."""
        with self._lock:
            records = list(self._load())
            gone = [r for r in records if r.id == which] or [r for r in records if r.name == which]
            if not gone:
                raise InputError(f"no token with id or name {which!r} in {self.path} (see `streamer tokens list`)")
            self._save([r for r in records if r not in gone])
        return gone

    def verify(self, token: str | None) -> TokenRecord | None:
        """The record of `token`, or None. Every hash is compared in constant time."""
        if not token:
            return None
        digest = _digest(token)
        found = None
        for record in self.records():
            if hmac.compare_digest(record.hash, digest):
                found = record
        return found

    def by_id(self, token_id: str) -> TokenRecord | None:
        return next((r for r in self.records() if r.id == token_id), None)


class Sessions:
    """Browser sessions: opaque random id -> token id, in memory only; idle ones expire."""

    def __init__(self, ttl_s: float = SESSION_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, float]] = {}

    def open(self, token_id: str) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sweep()
            self._sessions[sid] = (token_id, time.monotonic() + self.ttl_s)
        return sid

    def token_id(self, sid: str | None) -> str | None:
        if not sid:
            return None
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None or entry[1] < time.monotonic():
                self._sessions.pop(sid, None)
                return None
            self._sessions[sid] = (entry[0], time.monotonic() + self.ttl_s)
            return entry[0]

    def close(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def _sweep(self) -> None:
        now = time.monotonic()
        for sid in [s for s, (_, expires) in self._sessions.items() if expires < now]:
            del self._sessions[sid]


class LoginLimiter:
    """At most `per_minute` failed logins (or wrong bearer tokens) per client address in any 60 s."""

    WINDOW_S = 60.0
    MAX_CLIENTS = 10_000  # bounded memory under a spray from many addresses

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client)
        if failures is None:
            if len(self._failures) >= self.MAX_CLIENTS:
                for key in [k for k, v in self._failures.items() if not v or now - v[-1] > self.WINDOW_S]:
                    del self._failures[key]
                if len(self._failures) >= self.MAX_CLIENTS:
                    self._failures.pop(next(iter(self._failures)))
            failures = self._failures[client] = deque()
        while failures and now - failures[0] > self.WINDOW_S:
            failures.popleft()
        return failures

    def blocked(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None when it may now."""
        now = time.monotonic()
        with self._lock:
            failures = self._recent(client, now)
            if len(failures) < self.per_minute:
                return None
            return max(1.0, self.WINDOW_S - (now - failures[0]))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(client, now).append(now)
