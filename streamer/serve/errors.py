"""Every error answer is `{"error": "one sentence"}`; a bug is logged here and never shown as a traceback."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamer.errors import GalleryError, InputError, NoFaceError, StreamerError

log = logging.getLogger(__name__)


class APIError(Exception):
    """A 4xx (or 503) answer: `message` is one sentence for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Json(JSONResponse):
    """JSON as the CLI writes it (orjson, numpy scalars as numbers)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return Json({"error": message}, status_code=status, headers=headers)


def _sentence(text: str) -> str:
    line = (text.strip().splitlines() or [""])[0].strip()
    return line or "bad request"


def status_of(exc: StreamerError) -> int:
    if isinstance(exc, NoFaceError):
        return 422  # a valid image, but not what the call needs
    if isinstance(exc, GalleryError) and "no person named" in str(exc):
        return 404
    if isinstance(exc, (InputError, GalleryError)):
        return 400
    return 400


def _describe_validation(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "the request is not valid"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    where = ".".join(loc)
    kind = first.get("type", "")
    if kind == "missing":
        return f"missing field {where}" if where else "missing request body"
    if kind in ("json_invalid", "model_attributes_type", "dict_type") and not where:
        return "the request body must be a JSON object"
    message = str(first.get("msg", "invalid value")).rstrip(".")
    return f"{where}: {message}" if where else message


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(StreamerError)
    async def _streamer_error(request: Request, exc: StreamerError) -> JSONResponse:
        return error_response(status_of(exc), _sentence(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail: Any = exc.detail
        message = detail if isinstance(detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such page or API route: {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, _sentence(message), getattr(exc, "headers", None))


class CatchAll:
    """ASGI middleware: an unexpected exception is logged with its traceback and answered with one sentence
    (Starlette's own handler would re-raise it to the server, which prints the traceback again)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.close"):
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("%s %s failed", scope.get("method", "WS"), scope.get("path"), exc_info=exc)
            if started:
                return
            if scope["type"] == "http":
                await error_response(500, "internal error (the server log has the details)")(scope, receive, send)
            elif scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1011})
