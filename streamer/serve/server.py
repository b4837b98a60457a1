"""`streamer serve`: the Supervisor in the main thread, uvicorn serving the app in a thread beside it.

The listening socket is bound before anything else starts, so a port in use is one line and exit 2. SIGINT
and SIGTERM stop both: the supervisor drains as in `streamer run`, uvicorn closes its connections
(long-lived ones end at once: they watch `ServeContext.stopping`), and the process exits 0. The HTTP side
keeps serving after every source has ended, until it is told to stop: sources can be added over the API.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from streamer.config import Settings
from streamer.errors import ConfigError, StreamerError
from streamer.serve.auth import TokenStore, store_path
from streamer.serve.context import ServeContext

log = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


def _loopback(host: str) -> bool:
    from streamer.sockets import is_loopback

    return is_loopback(f"tcp://[{host}]:1" if ":" in host else f"tcp://{host}:1")


def bind_socket(host: str, port: int, setting: str = "serve.bind") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"{setting}: cannot listen on {host}:{port} ({exc.strerror or exc}); pick a free port "
            "(e.g. serve.bind 127.0.0.1:8081, STREAMER_SERVE__BIND) or stop what uses it"
        ) from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def check_tls(cert_file: Path, key_file: Path) -> None:
    """Load the pair once now, so a bad certificate or key is one line at start, not a dead server thread."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file, password=lambda: b"")
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"serve.tls_cert_file {cert_file} / serve.tls_key_file {key_file}: cannot use them for HTTPS "
            f"({getattr(exc, 'reason', None) or exc}); give a PEM certificate and its unencrypted PEM key"
        ) from None


class HttpServer:
    """uvicorn on an already bound socket, in a daemon thread; HTTPS when given a certificate and its key."""

    def __init__(self, app: Any, sock: socket.socket, ctx: ServeContext | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        import uvicorn

        self.sock = sock
        self.ctx = ctx
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))
        if tls is not None:
            check_tls(*tls)
        self.scheme = "https" if tls is not None else "http"
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=3,
            ws_max_size=1 << 20, server_header=False,
            ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None,
        )
        self.server = uvicorn.Server(config)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="streamer-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{self.scheme}://[{host}]:{port}" if ":" in host else f"{self.scheme}://{host}:{port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # reported by start() or the main loop, not lost in a thread
            self.error = exc
            log.error("the HTTP server stopped: %s", exc, exc_info=exc)

    def start(self) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise StreamerError(f"the HTTP server did not start on {self.url}: {self.error or 'timed out'}")
            time.sleep(0.02)
        return self

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        if self.ctx is not None:
            self.ctx.stopping.set()
        self.server.should_exit = True
        self.thread.join(STOP_TIMEOUT_S)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(2)
        self.sock.close()


def open_token_store(settings: Settings, config_file: str | Path | None) -> TokenStore:
    return TokenStore(store_path(settings, config_file))


def ensure_admin_token(store: TokenStore) -> str | None:
    """The first start with an empty store creates an "admin" token; returns it (to show once) or None."""
    if len(store):
        return None
    _, token = store.create("admin")
    return token


def run_serve(settings: Settings, config_file: str | Path | None = None) -> int:
    """`streamer serve`: returns the process exit code."""
    from streamer.pipeline.run import Supervisor
    from streamer.serve.app import create_app

    host, port = settings.serve.host_port
    sock = bind_socket(host, port)
    try:
        tokens = open_token_store(settings, config_file)
        tokens.records()  # a store that cannot be read fails now, in one line
        serve = settings.serve
        tls = (serve.tls_cert_file, serve.tls_key_file) if serve.tls else None
        if tls is not None:
            check_tls(*tls)  # before the pipeline starts anything
        gallery = settings.gallery.path
        if settings.gallery.url is not None or (gallery is not None and not Path(gallery).exists()):
            # An empty gallery (a file, or the schema in a PostgreSQL database), so the pipeline has one to
            # watch: the console enrols the first person into it.
            from streamer.match.open import open_gallery

            open_gallery(settings.gallery, create=True).close()
        supervisor = Supervisor(settings, progress=False, keep_running=True)
    except BaseException:
        sock.close()
        raise
    ctx = ServeContext(settings=settings, tokens=tokens, supervisor=supervisor)
    http = HttpServer(create_app(ctx), sock, ctx, tls=tls)
    if tls is None and not _loopback(host):  # allowed by serve.allow_plain_http only
        log.warning("the console on %s is plain HTTP beyond loopback: tokens, session cookies and faces cross the "
                    "network in clear unless a TLS proxy is in front (serve.tls_cert_file/serve.tls_key_file)",
                    settings.serve.bind)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        ctx.stopping.set()
        supervisor.request_stop()

    def watch_http() -> None:
        http.thread.join()
        if not stop.is_set():  # the HTTP side died on its own: stop the pipeline too, and say so
            supervisor.request_stop()

    previous: dict[int, Any] = {}
    try:
        http.start()
        threading.Thread(target=watch_http, name="streamer-http-watch", daemon=True).start()
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        # Made only now that the console is up, so a start that fails earlier never uses up the one showing.
        token = ensure_admin_token(tokens) if settings.serve.auth else None
        if token is not None:
            sys.stderr.write(
                f"streamer: created the admin token in {tokens.path} (shown once; `streamer tokens create` makes "
                f"more):\n{token}\n"
            )
        auth = "token required" if settings.serve.auth else "no auth: loopback only"
        sys.stderr.write(f"streamer: console and API on {http.url}/ ({auth}; API docs at {http.url}/docs)\n")
        sys.stderr.flush()
        supervisor.run()
        # The pipeline only returns once stopped (keep_running); should it end otherwise, the console stays.
        while not stop.is_set() and http.alive:
            stop.wait(0.2)
        if not stop.is_set():
            raise StreamerError(f"the HTTP server stopped: {http.error or 'unexpectedly'}")
    finally:
        http.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped serving on %s", http.url)
    return 0
