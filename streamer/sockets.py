"""The one ZeroMQ module: socket kinds, the defaults every socket uses, CURVE keys, and `make_socket`.

Every socket in streamer (worker links, the event publisher, subscribers) is made by `make_socket`, so
LINGER, high-water marks and the inbound size limit are always set, and one rule holds everywhere: a socket
that listens beyond this machine (anything but loopback, ipc:// or inproc://) must be a CURVE server with
an allow-list of client keys. Traffic is then encrypted and only listed clients get through; without keys
only local peers can connect at all.

Keys are pyzmq's certificate files (`zmq.auth.create_certificates`), laid out by `generate_keys`:

    DIR/server.key           server public key: copy to every client (--server-key, inference.server_key)
    DIR/server.key_secret    server secret key: stays on the server
    DIR/clients/NAME.key     one per allowed client: the allow-list, stays on the server
    DIR/clients/NAME.key_secret  that client's secret: move to the client (--client-key, inference.client_key)

Allow-lists are enforced by a ZAP handler (`zmq.auth.thread.ThreadAuthenticator`): one per context,
started with the first CURVE server socket on it, and stopped by `stop_authenticators` (also at exit).
The allow-list is read when the socket is made; a client added later needs a restart of the server.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final

import zmq
import zmq.auth
from zmq.utils import z85

from streamer.errors import ConfigError

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

REMEDY: Final = "make keys with `streamer keys generate DIR`"
SERVER_NAME: Final = "server"
CLIENTS_DIR: Final = "clients"
PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class SocketDefaults:
    """High-water marks (messages), linger and timeouts (ms) and size limits (bytes), in one place."""

    LINGER_MS: Final = 0  # never hang at exit on undelivered messages
    # Worker links
    REQUEST_HWM: Final = 64  # inference requests in flight per detect worker (each holds up to a batch of chips)
    RESULT_HWM: Final = 256
    EVENT_HWM: Final = 10_000  # detect worker -> supervisor events
    CONTROL_POLL_MS: Final = 50
    # libzmq drops a peer that sends a larger frame before we see it (ZMQ_MAXMSGSIZE): a batch of chips
    # is a few MiB, so this only stops garbage or abuse from a peer.
    MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
    # Event publisher and subscribers
    SNDHWM: Final = 10_000  # messages queued per subscriber before that subscriber starts losing them
    RCVHWM: Final = 10_000
    # Long enough for the last events (stream ended) to reach a live subscriber at shutdown, short enough
    # that a dead one cannot hang the exit.
    PUB_LINGER_MS: Final = 500
    SUB_LINGER_MS: Final = 0
    RECEIVE_TIMEOUT_MS: Final = 1_000
    # Waits are cut into slices this long so Ctrl-C is honoured promptly.
    POLL_SLICE_MS: Final = 200
    # A PUB socket only ever receives subscriptions (topic prefixes): anything bigger is not ours.
    SUBSCRIPTION_MAX_BYTES: Final = 64 * 1024


class SocketKind(IntEnum):
    PUB = zmq.PUB
    SUB = zmq.SUB
    PUSH = zmq.PUSH
    PULL = zmq.PULL
    DEALER = zmq.DEALER
    ROUTER = zmq.ROUTER


# -- endpoints --------------------------------------------------------------------------------------------
def is_loopback(endpoint: str) -> bool:
    """True when only this machine can reach `endpoint`: ipc://, inproc://, tcp:// on 127.0.0.0/8,
    localhost or [::1]. Wildcards (*, 0.0.0.0, [::]), other addresses, host and interface names: False."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    address = endpoint[len("tcp://"):].rsplit(";", 1)[-1]  # connect may name a source: "src;host:port"
    host, sep, _port = address.rpartition(":")
    if not sep or not host:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface or a host name: may be reachable from outside
        return False


def keys_setting_for(setting: str) -> str:
    """The keys setting that goes with an endpoint setting: publish.endpoint -> publish.keys."""
    return f"{setting.rsplit('.', 1)[0]}.keys" if "." in setting else "keys"


def needs_keys_message(endpoint: str, keys_setting: str) -> str:
    """Why binding `endpoint` without keys is refused (no setting prefix: config validators add theirs)."""
    return (
        f"{endpoint} listens beyond this machine, so it needs CURVE keys: set {keys_setting} "
        f"({REMEDY}), or bind 127.0.0.1"
    )


def check_bind(
    endpoint: str, keys: ServerKeys | Path | str | None, setting: str, keys_setting: str | None = None
) -> None:
    """Refuse (ConfigError) to listen beyond this machine without CURVE keys. `keys` may be loaded keys
    or just the configured folder (config validation, before anything is read)."""
    if keys is None and not is_loopback(endpoint):
        why = needs_keys_message(endpoint, keys_setting or keys_setting_for(setting))
        raise ConfigError(f"{setting or 'endpoint'}: {why}")


# -- keys -------------------------------------------------------------------------------------------------
def server_files(directory: Path) -> tuple[Path, Path]:
    """(public, secret) key files of the server in a keys folder."""
    return directory / f"{SERVER_NAME}{PUBLIC_SUFFIX}", directory / f"{SERVER_NAME}{SECRET_SUFFIX}"


def client_files(directory: Path, name: str) -> tuple[Path, Path]:
    """(public, secret) key files of client `name` in a keys folder."""
    return directory / CLIENTS_DIR / f"{name}{PUBLIC_SUFFIX}", directory / CLIENTS_DIR / f"{name}{SECRET_SUFFIX}"


def generate_keys(directory: Path, clients: Sequence[str] = ("client",)) -> list[Path]:
    """Write a server key pair and one key pair per client name (layout in the module docstring).

    Never overwrites: an existing client's files are a ConfigError (nothing is written then); an existing
    server pair is kept, so this also adds clients to a folder made earlier. Secret files are mode 0600,
    written in a private temporary folder first. Returns the files written.
    """
    directory = Path(directory).expanduser()
    names = list(clients)
    for name in names:
        if not _CLIENT_NAME.fullmatch(name):
            raise ConfigError(f"client name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    if len(set(names)) != len(names):
        raise ConfigError(f"client names must differ, got {names}")
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"keys folder {directory}: exists and is not a folder")
    public, secret = server_files(directory)
    make_server = not (public.exists() or secret.exists())
    if not make_server:
        ServerKeys.read_pair(directory, setting=f"keys folder {directory}")  # keep only a sound pair
    existing = [str(p) for name in names for p in client_files(directory, name) if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite existing keys: {', '.join(existing)} (pick another --client name)")
    if not make_server and not names:
        raise ConfigError(f"keys folder {directory}: server keys exist already and no client was asked for")
    try:
        (directory / CLIENTS_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
        written: list[Path] = []
        staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=directory))  # mode 0700: secrets never world-readable
        try:
            jobs = ([(SERVER_NAME, server_files(directory))] if make_server else []) + [
                (name, client_files(directory, name)) for name in names
            ]
            for name, targets in jobs:
                made = zmq.auth.create_certificates(staging, name)
                for source, target in zip(made, targets):
                    os.chmod(source, 0o600 if source.endswith(SECRET_SUFFIX) else 0o644)
                    os.replace(source, target)
                    written.append(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ConfigError(f"keys folder {directory}: cannot write keys: {exc.strerror or exc}") from None
    return written


def _read_key_file(path: Path, setting: str, *, secret: bool | None) -> tuple[bytes, bytes | None]:
    """(public, secret) from a key file. secret=True: the file must hold a secret key; False: it must
    not (a public key to hand out); None: either."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{setting}: {path} does not exist ({REMEDY})")
    if path.is_dir():
        raise ConfigError(f"{setting}: {path} is a folder, expected a key file ({REMEDY})")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:  # UnicodeError is a ValueError
        raise ConfigError(f"{setting}: {path} is not a CURVE key file ({exc}); {REMEDY}") from None
    for key in (public, secret_key):
        if key is not None and not _valid_z85_key(key):
            raise ConfigError(f"{setting}: {path} holds a malformed key; {REMEDY}")
    if secret is True and secret_key is None:
        raise ConfigError(f"{setting}: {path} holds only a public key; give the matching {SECRET_SUFFIX} file")
    if secret is False and secret_key is not None:
        raise ConfigError(
            f"{setting}: {path} holds a secret key; give the public {PUBLIC_SUFFIX} file "
            "(a secret stays with its owner)"
        )
    return public, secret_key


def _valid_z85_key(key: bytes) -> bool:
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


@dataclass(frozen=True)
class ServerKeys:
    """A CURVE server's key pair and the public keys of the clients it lets in."""

    directory: Path
    public: bytes
    secret: bytes = field(repr=False)
    clients_dir: Path
    clients: frozenset[bytes]  # allowed client public keys (z85), read from clients_dir/*.key

    @staticmethod
    def read_pair(directory: Path, setting: str) -> tuple[bytes, bytes]:
        public_file, secret_file = server_files(directory)
        public, secret = _read_key_file(secret_file, setting, secret=True)
        listed, _ = _read_key_file(public_file, setting, secret=None)
        if listed != public:
            raise ConfigError(f"{setting}: {public_file} and {secret_file} are not one pair ({REMEDY})")
        assert secret is not None
        return public, secret

    @classmethod
    def load(cls, directory: Path | str, setting: str = "publish.keys") -> ServerKeys:
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise ConfigError(f"{setting}: keys folder {directory} does not exist ({REMEDY})")
        public, secret = cls.read_pair(directory, setting)
        clients_dir = directory / CLIENTS_DIR
        if not clients_dir.is_dir():
            raise ConfigError(f"{setting}: {clients_dir} does not exist, so no client could connect ({REMEDY})")
        clients = frozenset(
            _read_key_file(path, setting, secret=None)[0] for path in sorted(clients_dir.glob(f"*{PUBLIC_SUFFIX}"))
        )
        if not clients:
            raise ConfigError(
                f"{setting}: {clients_dir} holds no client keys (*{PUBLIC_SUFFIX}), so no client could connect; "
                f"add one with `streamer keys generate {directory} --client NAME`"
            )
        return cls(directory, public, secret, clients_dir, clients)


@dataclass(frozen=True)
class ClientKeys:
    """A CURVE client's key pair and the public key of the server it trusts."""

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes

    @classmethod
    def load(
        cls,
        secret_file: Path | str,
        server_public_file: Path | str,
        *,
        secret_setting: str = "inference.client_key",
        server_setting: str = "inference.server_key",
    ) -> ClientKeys:
        public, secret = _read_key_file(Path(secret_file), secret_setting, secret=True)
        server_public, _ = _read_key_file(Path(server_public_file), server_setting, secret=False)
        assert secret is not None
        return cls(public, secret, server_public)


# -- ZAP: one authenticator per context -------------------------------------------------------------------
_auth_lock = threading.Lock()
# id(context) -> (context, its authenticator, the pid that started it: a forked child must not touch it)
_authenticators: dict[int, tuple[zmq.Context, ThreadAuthenticator, int]] = {}
_atexit_registered = False


def _zap_domain(keys: ServerKeys) -> str:
    """One ZAP domain per allow-list, so two servers on one context never share each other's clients."""
    return "streamer-" + hashlib.sha256(str(keys.clients_dir.resolve()).encode()).hexdigest()[:16]


def _allow_list(context: zmq.Context, keys: ServerKeys, setting: str) -> str:
    """Start the context's authenticator if needed, load `keys`' allow-list into it; returns the domain."""
    global _atexit_registered
    from zmq.auth.thread import ThreadAuthenticator  # asyncio underneath: only imported when CURVE is used

    domain = _zap_domain(keys)
    with _auth_lock:
        entry = _authenticators.get(id(context))
        if entry is None or entry[0] is not context or entry[2] != os.getpid():
            authenticator = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
            try:
                authenticator.start()
            except zmq.ZMQError as exc:
                authenticator.stop()
                raise ConfigError(f"{setting}: cannot start the CURVE authenticator: {exc.strerror}") from None
            _authenticators[id(context)] = entry = (context, authenticator, os.getpid())
            if not _atexit_registered:
                atexit.register(stop_authenticators)
                _atexit_registered = True
        authenticator = entry[1]
        authenticator.configure_curve(domain=domain, location=str(keys.clients_dir))
        if not authenticator.certs.get(domain):
            raise ConfigError(f"{setting}: no client key could be read from {keys.clients_dir} ({REMEDY})")
    return domain


def stop_authenticators(context: zmq.Context | None = None) -> None:
    """Stop the ZAP thread of `context` (None: of every context). Call before `context.term()`, which
    would otherwise wait for the authenticator's sockets; registered at exit too."""
    with _auth_lock:
        keys = [k for k, (ctx, _, _) in _authenticators.items() if context is None or ctx is context]
        entries = [_authenticators.pop(k) for k in keys]
    for ctx, authenticator, pid in entries:
        if pid == os.getpid() and not ctx.closed:
            authenticator.stop()


def has_authenticator(context: zmq.Context) -> bool:
    """Whether this process runs a ZAP authenticator on `context`."""
    with _auth_lock:
        entry = _authenticators.get(id(context))
    return entry is not None and entry[0] is context and entry[2] == os.getpid() and entry[1].is_alive()


# -- sockets ----------------------------------------------------------------------------------------------
def make_socket(
    context: zmq.Context,
    kind: SocketKind | int,
    *,
    hwm: int,
    bind: str | None = None,
    connect: str | None = None,
    linger_ms: int = SocketDefaults.LINGER_MS,
    max_message_bytes: int | None = None,
    server_keys: ServerKeys | None = None,
    client_keys: ClientKeys | None = None,
    setting: str = "",
    keys_setting: str | None = None,
) -> zmq.Socket:
    """A socket with LINGER, SNDHWM = RCVHWM = `hwm` and MAXMSGSIZE set, optionally CURVE, bound and/or
    connected. Binding beyond loopback without `server_keys`, and bind/connect failures, are ConfigErrors
    naming `setting` (e.g. "publish.endpoint"); `keys_setting` defaults to its sibling ".keys" setting."""
    if hwm < 0:
        raise ValueError(f"hwm: expected >= 0, got {hwm}")
    if server_keys is not None and client_keys is not None:
        raise ValueError("a socket is a CURVE server or a CURVE client, not both")
    name = setting or "endpoint"
    if bind is not None:
        check_bind(bind, server_keys, name, keys_setting or keys_setting_for(setting))
    socket = context.socket(int(kind))
    try:
        socket.setsockopt(zmq.LINGER, linger_ms)
        socket.setsockopt(zmq.SNDHWM, hwm)
        socket.setsockopt(zmq.RCVHWM, hwm)
        socket.setsockopt(zmq.MAXMSGSIZE, -1 if max_message_bytes is None else max_message_bytes)
        if server_keys is not None:
            # The allow-list must be in place before the first peer can connect.
            socket.setsockopt_string(zmq.ZAP_DOMAIN, _allow_list(context, server_keys, name))
            # Fail closed: with the authenticator stopped (or never reachable) libzmq would otherwise let
            # any client that knows the server's public key in.
            socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            socket.setsockopt(zmq.CURVE_PUBLICKEY, server_keys.public)
            socket.setsockopt(zmq.CURVE_SECRETKEY, server_keys.secret)
            socket.setsockopt(zmq.CURVE_SERVER, 1)
        elif client_keys is not None:
            socket.setsockopt(zmq.CURVE_PUBLICKEY, client_keys.public)
            socket.setsockopt(zmq.CURVE_SECRETKEY, client_keys.secret)
            socket.setsockopt(zmq.CURVE_SERVERKEY, client_keys.server_public)
        if bind is not None:
            try:
                socket.bind(bind)
            except zmq.ZMQError as exc:
                hint = " (another process is using it; pick another port)" if exc.errno == errno.EADDRINUSE else ""
                raise ConfigError(f"{name}: cannot bind {bind!r}: {exc.strerror}{hint}") from None
        if connect is not None:
            try:
                socket.connect(connect)
            except zmq.ZMQError as exc:
                raise ConfigError(f"{name}: cannot connect to {connect!r}: {exc.strerror}") from None
    except BaseException:
        socket.close(linger=0)
        raise
    return socket


def bound_endpoint(socket: zmq.Socket) -> str:
    """The endpoint a socket actually bound (a tcp "*" port resolved)."""
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


__all__ = [
    "ClientKeys",
    "ServerKeys",
    "SocketDefaults",
    "SocketKind",
    "bound_endpoint",
    "check_bind",
    "client_files",
    "generate_keys",
    "has_authenticator",
    "is_loopback",
    "keys_setting_for",
    "make_socket",
    "needs_keys_message",
    "server_files",
    "stop_authenticators",
]
