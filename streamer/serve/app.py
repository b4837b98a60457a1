"""The FastAPI app of `streamer serve`: auth in front of every route, the API routers, the pages.

Auth is an ASGI middleware rather than a per-route dependency, so no route (OpenAPI and /docs included,
and any route added later) can be left open by forgetting it. Only the login page, the login call and the
two static files the login page needs are open.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers

from streamer.serve import errors
from streamer.serve.auth import SESSION_COOKIE
from streamer.serve.context import ServeContext
from streamer.serve.errors import APIError, Json, error_response

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# (method, path) that need no token: what the login page needs to show and to log in.
OPEN = frozenset({
    ("GET", "/login"), ("HEAD", "/login"), ("POST", "/api/v1/login"),
    ("GET", "/static/login.js"), ("HEAD", "/static/login.js"),
    ("GET", "/static/style.css"), ("HEAD", "/static/style.css"),
})
# Scripts, styles and connections from this server only (no inline script, no CDN: /docs included), images
# also as blob: (thumbnails fetched with no-store) and data: (Swagger UI's icons), and no framing.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
]
DOCS_ASSETS = "/docs-assets"  # Swagger UI's files, from the fastapi-offline package


def client_of(scope: Any) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class AuthMiddleware:
    """Bearer token or session cookie on every HTTP request and WebSocket; API calls that lack one get 401
    JSON, pages a 303 to /login, WebSockets a close before accept (HTTP 403). Wrong bearer tokens count as
    failed logins of the client's address."""

    def __init__(self, app: Any, ctx: ServeContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            inner_send = send

            async def send(message: Any) -> None:  # the security headers go on every answer
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
                await inner_send(message)

        path, method = scope["path"], scope.get("method", "GET")
        if scope["type"] == "http" and (method, path) in OPEN:
            await self.app(scope, receive, send)
            return
        refusal, record = self.authenticate(scope)
        if refusal is None and scope["type"] == "websocket" and not _same_origin(scope):
            refusal = (403, "this WebSocket comes from another site's page")
        if refusal is not None:
            await self.refuse(scope, receive, send, *refusal)
            return
        scope.setdefault("state", {})["token"] = record
        await self.app(scope, receive, send)

    def authenticate(self, scope: Any) -> tuple[tuple[int, str] | None, Any]:
        ctx = self.ctx
        if not ctx.settings.serve.auth:
            return None, None
        headers = Headers(scope=scope)
        authorization = headers.get("authorization")
        if authorization:
            scheme, _, credential = authorization.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                return (401, "the Authorization header must be: Bearer <token>"), None
            client = client_of(scope)
            wait = ctx.limiter.blocked(client)
            if wait is not None:
                return (429, f"too many failed logins from {client}: try again in {wait:.0f} s"), None
            record = ctx.tokens.verify(credential.strip())
            if record is None:
                ctx.limiter.failed(client)
                log.warning("refused a wrong token from %s", client)  # never the token itself
                return (401, "wrong or revoked token (create one with `streamer tokens create`)"), None
            return None, record
        sid = _cookie(headers, SESSION_COOKIE)
        token_id = ctx.sessions.token_id(sid)
        record = ctx.tokens.by_id(token_id) if token_id else None
        if record is None:
            if sid:
                ctx.sessions.close(sid)  # its token was revoked
            return (401, "log in first: send Authorization: Bearer <token>, or log in at /login"), None
        return None, record

    async def refuse(self, scope: Any, receive: Any, send: Any, status: int, message: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        path = scope["path"]
        if status == 401 and not path.startswith("/api/") and scope.get("method") in ("GET", "HEAD"):
            response: Response = RedirectResponse("/login", status_code=303)
        else:
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
            if status == 429:
                headers["Retry-After"] = "60"
            response = error_response(status, message, headers)
        await response(scope, receive, send)


def _cookie(headers: Headers, name: str) -> str | None:
    from http.cookies import CookieError, SimpleCookie

    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel else None


def _same_origin(scope: Any) -> bool:
    """Browsers send Origin on WebSockets and do not apply SameSite to them the same way everywhere; a page
    of another site must not open one with the user's cookie. Clients that are not browsers send none."""
    headers = Headers(scope=scope)
    origin = headers.get("origin")
    if not origin:
        return True
    return urlsplit(origin).netloc.lower() == (headers.get("host") or "").lower()


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=512)


def _page(name: str, title: str) -> Response:
    file = STATIC_DIR / name
    if file.is_file():
        return FileResponse(file, media_type="text/html", headers={"Cache-Control": "no-cache"})
    # The console's pages are shipped in streamer/serve/static/; without them the API still works.
    return HTMLResponse(f"<!doctype html><title>{title}</title><h1>{title}</h1>"
                        "<p>The console pages are not installed; the REST API is at <a href=/docs>/docs</a>.</p>")


def _secure(ctx: ServeContext, request: Request) -> bool:
    """The session cookie is only sent over HTTPS when this server speaks it (or a proxy in front says so)."""
    return bool(ctx.settings.serve.tls) or request.url.scheme == "https"


def _swagger_ui_dir() -> Path:
    try:
        import fastapi_offline
    except ImportError:  # the API works without it; /docs then shows the page without its UI
        log.warning("fastapi-offline is not installed: /docs cannot show Swagger UI (pip install fastapi-offline)")
        return STATIC_DIR / "missing"
    return Path(fastapi_offline.__file__).resolve().parent / "static"


def create_app(ctx: ServeContext) -> FastAPI:
    from streamer import __version__
    from streamer.serve import (
        api_events,
        api_gallery,
        api_images,
        api_strangers,
        api_streams,
    )

    app = FastAPI(
        title="streamer",
        version=__version__,
        description="Face analytics REST API. Every call needs `Authorization: Bearer <token>` "
        "(`streamer tokens create`) or the session cookie set by POST /api/v1/login.",
        default_response_class=Json,
        # FastAPI's own /docs loads Swagger UI from a CDN, which offline sites cannot reach, and starts it
        # with an inline script the CSP refuses: /docs is served below from local files instead.
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    errors.install(app)
    app.include_router(api_images.router)
    app.include_router(api_gallery.router)
    app.include_router(api_streams.router)
    app.include_router(api_strangers.router)
    app.include_router(api_events.router)

    @app.post("/api/v1/login", status_code=204, tags=["auth"], summary="exchange a token for a session cookie")
    async def login(request: Request, body: Login) -> Response:
        client = client_of(request.scope)
        wait = ctx.limiter.blocked(client)
        if wait is not None:
            return error_response(429, f"too many failed logins from {client}: try again in {wait:.0f} s",
                                  {"Retry-After": f"{wait:.0f}"})
        record = ctx.tokens.verify(body.token.strip())
        if record is None:
            ctx.limiter.failed(client)
            log.warning("failed login from %s", client)
            raise APIError(401, "wrong or revoked token")
        response = Response(status_code=204)
        response.set_cookie(SESSION_COOKIE, ctx.sessions.open(record.id), httponly=True, samesite="strict",
                            path="/", secure=_secure(ctx, request))
        return response

    @app.post("/api/v1/logout", status_code=204, tags=["auth"], summary="end this browser session")
    async def logout(request: Request) -> Response:
        ctx.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(ctx, request))
        return response

    @app.get("/api/v1/me", tags=["auth"], summary="the token this request is authenticated with")
    async def me(request: Request) -> Json:
        record = getattr(request.state, "token", None)
        return Json({"token": record.name if record is not None else None})

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _page("index.html", "streamer")

    @app.get("/login", include_in_schema=False)
    async def login_page() -> Response:
        return _page("login.html", "streamer: log in")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return _page("docs.html", "streamer API")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=_swagger_ui_dir(), check_dir=False), name="docs-assets")
    app.add_middleware(AuthMiddleware, ctx=ctx)  # before any route
    app.add_middleware(errors.CatchAll)  # outermost: a bug in auth is one sentence too
    if ctx.supervisor is not None and hasattr(ctx.supervisor, "add_tap"):
        ctx.supervisor.add_tap(ctx.tap, wants_crops=True)
    return app
