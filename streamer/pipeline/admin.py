"""A small local admin channel into a running pipeline: what `streamer gallery promote u-17 NAME` asks.

The stranger clusters live in the supervisor's memory, so a command that enrols one must reach that
process. The supervisor binds a ZeroMQ REP socket on ipc:// inside its private temporary folder (0700:
only this user can connect) and announces it in a registry file of this user:

    $XDG_RUNTIME_DIR/streamer/admin-<hash of the gallery's id>-<pid>.json   (else the temp dir's
    streamer-admin-<uid>/ ...; the folder 0700, the file 0600)

so a command finds the pipelines that match against the gallery it is told about. A gallery's id is its
file's absolute path, or for PostgreSQL the URL's user, server, port and database (never its password). Requests and replies are
typed (pydantic), validated on receipt, bounded in size, and every wait has a timeout; a stale registry file
(its process gone) is removed by whoever finds it.

    {"type": "stranger.faces", "stranger": "u-17"}   -> {"type": "stranger.faces", "embedder": ..., "faces": [...]}
    {"type": "stranger.forget", "stranger": "u-17"}  -> {"type": "ok"}  (after a promotion: the id is done)

Embeddings never leave the machine on this channel: ipc:// only, and the folder admits this user alone.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import zmq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streamer.sockets import make_socket

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 2 * 1024 * 1024
MAX_FACES = 32
REQUEST_TIMEOUT_S = 3.0
_POLL_MS = 100
_STRANGER_ID = r"^u-[1-9][0-9]{0,9}$"


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class StrangerFacesRequest(_Message):
    type: Literal["stranger.faces"] = "stranger.faces"
    stranger: str = Field(pattern=_STRANGER_ID)


class ForgetStrangerRequest(_Message):
    type: Literal["stranger.forget"] = "stranger.forget"
    stranger: str = Field(pattern=_STRANGER_ID)


AdminRequest = Annotated[Union[StrangerFacesRequest, ForgetStrangerRequest], Field(discriminator="type")]


class FaceVector(_Message):
    embedding: list[float] = Field(min_length=1, max_length=4096)
    quality: float = Field(ge=0, le=1)
    stream: str = Field(max_length=100)
    seen_at: float


class StrangerFacesReply(_Message):
    type: Literal["stranger.faces"] = "stranger.faces"
    stranger: str = Field(pattern=_STRANGER_ID)
    embedder: str = Field(min_length=1, max_length=200)
    faces: list[FaceVector] = Field(max_length=MAX_FACES)  # best first; empty: no such stranger (or expired)


class OkReply(_Message):
    type: Literal["ok"] = "ok"
    found: bool = True


class ErrorReply(_Message):
    type: Literal["error"] = "error"
    message: str = Field(max_length=500)


AdminReply = Annotated[Union[StrangerFacesReply, OkReply, ErrorReply], Field(discriminator="type")]
_REQUEST: TypeAdapter[AdminRequest] = TypeAdapter(AdminRequest)
_REPLY: TypeAdapter[AdminReply] = TypeAdapter(AdminReply)


class Registration(_Message):
    """One running pipeline, as its registry file says."""

    gallery: str = Field(max_length=4096)
    endpoint: str = Field(pattern=r"^ipc://", max_length=4096)
    pid: int = Field(ge=1)
    embedder: str = Field(max_length=200)
    started: float


# -- the registry ----------------------------------------------------------------------------------------
def registry_dir() -> Path:
    """This user's folder of registry files (made 0700 when missing)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir() and _owned_private(Path(runtime)):
        folder = Path(runtime) / "streamer"
    else:
        folder = Path(tempfile.gettempdir()) / f"streamer-admin-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.is_symlink() or not _owned_private(folder):
        raise OSError(f"{folder} is not a private folder of this user")
    return folder


def _owned_private(path: Path) -> bool:
    info = path.lstat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


def gallery_id(gallery: Any) -> str:
    """How the registry names `gallery` (a path, or a postgresql:// URL as str or SecretStr)."""
    from streamer.match.gallery_pg import is_url, parse_url

    text = gallery.get_secret_value() if hasattr(gallery, "get_secret_value") else gallery
    if not is_url(text):
        return str(Path(text).expanduser().resolve())
    params = parse_url(text)
    # libpq's defaults, so that postgresql://localhost/db and postgresql://me@localhost:5432/db are one gallery
    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or user
    return f"postgresql://{user}@{host}:{port}/{dbname}"


def gallery_key(gallery: Any) -> str:
    return hashlib.sha256(gallery_id(gallery).encode()).hexdigest()[:16]


def find_pipelines(gallery: Any) -> list[Registration]:
    """The running pipelines of this user that match against `gallery` (stale registrations are removed)."""
    try:
        folder = registry_dir()
    except OSError:
        return []
    found = []
    resolved = gallery_id(gallery)
    for path in sorted(folder.glob(f"admin-{gallery_key(gallery)}-*.json")):
        try:
            if path.is_symlink() or not _owned_private(path) or path.stat().st_size > 16 * 1024:
                continue
            registration = Registration.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            continue
        if not _alive(registration.pid):
            path.unlink(missing_ok=True)
            continue
        if registration.gallery == resolved:
            found.append(registration)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process took the pid: not ours
    return True


# -- the server (in the supervisor) ---------------------------------------------------------------------
class AdminServer:
    """Answers admin requests from its own thread (the book is thread-safe); `close` stops it and removes
    the registry file."""

    def __init__(self, book: Any, folder: str | Path, gallery: Any, *, context: zmq.Context | None = None) -> None:
        self.book = book
        self.endpoint = f"ipc://{Path(folder) / 'admin'}"
        self._context = context or zmq.Context.instance()
        self._socket = make_socket(self._context, zmq.REP, hwm=16, bind=self.endpoint, linger_ms=0,
                                   max_message_bytes=MAX_REQUEST_BYTES, setting="admin")
        self._stop = threading.Event()
        self.registry_file: Path | None = None
        registration = Registration(gallery=gallery_id(gallery), endpoint=self.endpoint,
                                    pid=os.getpid(), embedder=book.embedder_id, started=time.time())
        try:
            path = registry_dir() / f"admin-{gallery_key(gallery)}-{os.getpid()}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(registration.model_dump_json().encode())
            self.registry_file = path
        except OSError as exc:  # promote then cannot find us; the run itself is fine
            log.warning("no admin registry file (gallery promote will not find this run): %s", exc)
        self._thread = threading.Thread(target=self._serve, name="streamer-admin", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(_POLL_MS):
                    continue
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                continue
            reply = self._answer(frames)
            try:
                self._socket.send(reply.model_dump_json().encode(), zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("admin reply not sent: %s", exc)
        # the socket belongs to this thread: closed here, never from another
        self._socket.close(linger=0)

    def _answer(self, frames: list[bytes]) -> StrangerFacesReply | OkReply | ErrorReply:
        if len(frames) != 1:
            return ErrorReply(message=f"expected 1 frame, got {len(frames)}")
        try:
            request = _REQUEST.validate_json(frames[0])
        except ValidationError as exc:
            return ErrorReply(message=f"invalid request: {exc.errors()[0]['msg']}"[:500])
        try:
            if isinstance(request, ForgetStrangerRequest):
                return OkReply(found=bool(self.book.forget(request.stranger)))
            faces = self.book.best_faces(request.stranger)[:MAX_FACES]
            return StrangerFacesReply(
                stranger=request.stranger, embedder=self.book.embedder_id,
                faces=[FaceVector(embedding=[float(v) for v in f.embedding], quality=min(max(f.quality, 0.0), 1.0),
                                  stream=f.stream[:100], seen_at=f.seen_at) for f in faces],
            )
        except Exception as exc:  # noqa: BLE001 - a bug must answer, not leave the asker waiting
            log.exception("admin request failed")
            return ErrorReply(message=f"{type(exc).__name__}: {exc}"[:500])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        if self.registry_file is not None:
            self.registry_file.unlink(missing_ok=True)
            self.registry_file = None


# -- the client (the CLI) ---------------------------------------------------------------------------------
class AdminUnavailable(Exception):
    """The pipeline did not answer in time (busy, or gone since its registry file was read)."""


def ask(endpoint: str, request: StrangerFacesRequest | ForgetStrangerRequest,
        timeout_s: float = REQUEST_TIMEOUT_S, *, context: zmq.Context | None = None) -> StrangerFacesReply | OkReply:
    """Send one request, wait at most `timeout_s` for the reply; AdminUnavailable on timeout, ValueError on
    a malformed reply or an error reply."""
    socket = make_socket(context or zmq.Context.instance(), zmq.REQ, hwm=1, connect=endpoint, linger_ms=0,
                         max_message_bytes=MAX_REPLY_BYTES, setting="admin")
    try:
        socket.send(request.model_dump_json().encode(), zmq.NOBLOCK)
        if not socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise AdminUnavailable(f"no answer from the pipeline at {endpoint} within {timeout_s:g} s")
        frames = socket.recv_multipart(zmq.NOBLOCK)
    except zmq.ZMQError as exc:
        raise AdminUnavailable(f"cannot reach the pipeline at {endpoint}: {exc}") from None
    finally:
        socket.close(linger=0)
    if len(frames) != 1:
        raise ValueError(f"admin reply: expected 1 frame, got {len(frames)}")
    try:
        reply = _REPLY.validate_json(frames[0])
    except ValidationError as exc:
        raise ValueError(f"admin reply: {exc.errors()[0]['msg']}") from None
    if isinstance(reply, ErrorReply):
        raise ValueError(f"the pipeline says: {reply.message}")
    return reply
