"""Request bodies with images: multipart/form-data or JSON with base64 images (DeepFace's API style).

Both are read as a stream with caps: a request that declares more than it may send is refused (413) before
a byte of its body is read, and one that sends more is cut off as soon as a file passes
serve.max_upload_mb. Files stay in memory (never a temporary file: a face must not reach the disk unless it
is enrolled), so the caps also bound the memory a request can take.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request

from streamer.serve.errors import APIError

MAX_FILES = 10  # per request: enrolment takes several photos, verify two
MAX_FIELD_BYTES = 64 * 1024  # a name, a face choice
MAX_JSON_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class Upload:
    field: str
    filename: str  # as the client named it ("" when it did not); never a path on this machine
    data: bytes

    @property
    def label(self) -> str:
        return f"{self.field} ({self.filename})" if self.filename else self.field


@dataclass
class Form:
    files: dict[str, list[Upload]] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def file(self, name: str) -> Upload:
        found = self.files.get(name)
        if not found:
            raise APIError(422, f"missing field {name} (an image file)")
        return found[0]

    def file_list(self, name: str) -> list[Upload]:
        found = self.files.get(name)
        if not found:
            raise APIError(422, f"missing field {name} (one or more image files)")
        return found


def max_file_bytes(settings: Any) -> int:
    return int(settings.serve.max_upload_mb * 1024 * 1024)


def too_large(settings: Any) -> APIError:
    return APIError(
        413,
        f"upload over the limit of {settings.serve.max_upload_mb:g} MB per image set by serve.max_upload_mb: "
        "send a smaller image",
    )


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise APIError(400, "the Content-Length header is not a number") from None


async def read_form(request: Request, settings: Any) -> Form:
    """The body as files and fields: multipart/form-data, or a JSON object whose string values are fields
    (images as base64, optionally as data: URLs) and whose lists are several values of one field."""
    content_type = request.headers.get("content-type", "")
    per_file = max_file_bytes(settings)
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request, content_type, per_file)
    if content_type.split(";")[0].strip() in ("application/json", ""):
        cap = MAX_FILES * (per_file * 4 // 3 + 4) + MAX_JSON_OVERHEAD  # base64 is 4/3 of the bytes
        declared = _declared_length(request)
        if declared is not None and declared > cap:
            raise too_large(settings)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > cap:
                raise too_large(settings)
        if not body:
            raise APIError(422, "missing request body: send multipart/form-data or a JSON object")
        return _json_form(bytes(body), per_file, settings)
    raise APIError(415, f"unsupported content type {content_type.split(';')[0]!r}: send multipart/form-data or JSON")


def _json_form(body: bytes, per_file: int, settings: Any) -> Form:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    form = Form()
    for key, value in data.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise APIError(400, f"{key}: expected a string (base64 for an image)")
            form.fields.setdefault(key, str(item))
            if isinstance(item, str):
                form.files.setdefault(key, []).append(Upload(key, "", _b64_lazy(item)))
    # In JSON every string is both a field and a possible image: the route decides which it reads, and only
    # then is base64 decoded.
    for uploads in form.files.values():
        for upload in uploads:
            if len(upload.data) > per_file * 4 // 3 + 4:
                raise too_large(settings)
    return form


def _b64_lazy(text: str) -> bytes:
    # Kept as text bytes; decode_b64 turns it into image bytes when a route asks for an image.
    return text.encode("ascii", "replace")


def image_bytes(upload: Upload, settings: Any, from_json: bool) -> bytes:
    if not from_json:
        return upload.data
    text = upload.data
    if text.startswith(b"data:"):
        head, sep, rest = text.partition(b",")
        if not sep or b";base64" not in head:
            raise APIError(400, f"{upload.field}: a data: URL must be base64 (data:image/jpeg;base64,...)")
        text = rest
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{upload.field}: not base64 (send the image's bytes as base64, or use multipart)") from None
    if len(data) > max_file_bytes(settings):
        raise too_large(settings)
    return data


def decode_upload(upload: Upload, settings: Any, from_json: bool) -> np.ndarray:
    """The image of an upload as BGR pixels; InputError (400) naming the field when it is not an image."""
    from streamer.imaging import decode_image

    return decode_image(image_bytes(upload, settings, from_json), settings.limits.max_image_pixels, upload.label)


def is_json(request: Request) -> bool:
    return not request.headers.get("content-type", "").startswith("multipart/form-data")


class _MultipartReader:
    def __init__(self, per_file: int) -> None:
        self.per_file = per_file
        self.form = Form()
        self.files = 0
        self._headers: dict[bytes, bytes] = {}
        self._name = b""
        self._value = b""
        self._field = ""
        self._filename: str | None = None
        self._data = bytearray()
        self.too_large = False

    def on_part_begin(self) -> None:
        self._headers, self._data, self._filename, self._field = {}, bytearray(), None, ""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise APIError(400, "a multipart part has no field name (Content-Disposition: form-data; name=...)")
        self._field = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            self._filename = options[b"filename"].decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
            self.files += 1
            if self.files > MAX_FILES:
                raise APIError(400, f"too many files in one request (at most {MAX_FILES})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.per_file if self._filename is not None else MAX_FIELD_BYTES
        if len(self._data) + (end - start) > limit:
            if self._filename is not None:
                self.too_large = True
                raise _TooLarge()
            raise APIError(400, f"field {self._field} is over {MAX_FIELD_BYTES // 1024} KB")
        self._data.extend(data[start:end])

    def on_part_end(self) -> None:
        if self._filename is None:
            self.form.fields.setdefault(self._field, self._data.decode("utf-8", "replace"))
        elif self._filename or self._data:  # an empty file input of a browser form is no file
            self.form.files.setdefault(self._field, []).append(Upload(self._field, self._filename, bytes(self._data)))


class _TooLarge(Exception):
    pass


async def _read_multipart(request: Request, content_type: str, per_file: int) -> Form:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    settings = request.app.state.ctx.settings
    declared = _declared_length(request)
    if declared is not None and declared > MAX_FILES * per_file + MAX_JSON_OVERHEAD:
        raise too_large(settings)
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise APIError(400, "multipart/form-data without a boundary")
    reader = _MultipartReader(per_file)
    callbacks = {name: getattr(reader, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except _TooLarge:
        raise too_large(settings) from None
    except FormParserError:
        raise APIError(400, "the body is not valid multipart/form-data") from None
    return reader.form
