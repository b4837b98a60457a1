"""The face library: /api/v1/people. The same checks and the same gallery as `streamer gallery`.

The gallery is a file or a PostgreSQL database (gallery.path or gallery.url), opened through
streamer.match.open as the CLI does. Enrolment refuses what `gallery add` refuses (no face, several faces
without `face`, a face too small, blurred or turned away). Deleting a person is the CLI's forget-me: their
vectors are erased (from the file, or from the database's relation files). A running pipeline follows the
gallery (the file's data version, PostgreSQL's NOTIFY), so it sees every edit here within a second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from streamer.errors import StreamerError
from streamer.imaging import decode_image
from streamer.serve.api_images import relabel
from streamer.serve.errors import APIError, Json
from streamer.serve.uploads import image_bytes, is_json, read_form

router = APIRouter(prefix="/api/v1", tags=["gallery"])

_ENROL_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["img"],
                    "properties": {
                        "name": {"type": "string", "description": "the person's name (POST /people only)"},
                        "img": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "face": {"type": "string", "description": "'largest' or N (1-based, left to right) "
                                 "for a photo with several faces"},
                    },
                }
            }
        },
    }
}


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="the new name")


def parse_face(text: str | None) -> str | int | None:
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text == "largest":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise APIError(400, f"face must be 'largest' or a face number from 1 (counted left to right), got {text!r}")


def _gallery(where: Any, *, create: bool = False, readonly: bool = False) -> Any:
    from streamer.match.open import open_gallery

    return open_gallery(where, create=create, readonly=readonly)


def _exists(where: Any) -> bool:
    """A gallery file that is not there yet is an empty gallery (the first enrolment creates it)."""
    return not isinstance(where, Path) or where.exists()


def _must_exist(path: Any, name: str) -> None:
    """404 for a person (or a gallery) that is not there."""
    if not _exists(path):
        raise APIError(404, f"no person named {name!r}: the gallery is empty")
    with _gallery(path, create=False, readonly=True) as gallery:
        if name.strip() not in gallery.names():
            raise APIError(404, f"no person named {name.strip()!r} in the gallery")


async def enrol_arrays(ctx: Any, name: str, images: list[tuple[str, str, bytes, np.ndarray]], face: Any,
                       *, new: bool | None, checked: bool = True) -> Json:
    """Embed `images` ((label, source name, bytes, pixels)) and store them under `name`; `new` True: the
    person must not exist yet, False: must exist, None: either. `checked`: the enrolment checks of
    `gallery add` (uploads); without, the primary face as it is (a face the pipeline already tracked)."""
    from streamer.match.gallery import clean_name

    path = ctx.require_gallery()
    try:
        cleaned = clean_name(name)
    except StreamerError as exc:
        raise APIError(400, str(exc)) from None

    def embed(engine: Any) -> tuple[np.ndarray, str]:
        vectors = []
        for label, _, _, pixels in images:
            try:
                _, vector = engine.enrolment_face(pixels, face) if checked else engine.embed_primary(pixels)
            except StreamerError as exc:
                raise relabel(exc, label) from None
            vectors.append(vector)
        return np.stack(vectors).astype(np.float32), engine.embedder.spec.id

    def store(vectors: np.ndarray, embedder_id: str) -> Any:
        with ctx.gallery_lock:
            if new is False and not _exists(path):
                raise APIError(404, f"no person named {cleaned!r}: the gallery is empty")
            # One open for the check and the write: for PostgreSQL each open is a connection (and a LISTEN one).
            with _gallery(path, create=True) as gallery:
                exists = cleaned in gallery.names()
                if new is True and exists:
                    raise APIError(409, f"{cleaned!r} is already enrolled: add faces with POST "
                                        "/api/v1/people/{name}/faces")
                if new is False and not exists:
                    raise APIError(404, f"no person named {cleaned!r} in the gallery")
                # The same key as the CLI: sha256 of the photo's bytes, so a photo enrolled either way is not
                # added twice.
                hashes = [hashlib.sha256(data).hexdigest() for _, _, data, _ in images]
                sources = [source or "upload" for _, source, _, _ in images]
                return gallery.enrol([(cleaned, vectors, sources, hashes)], embedder_id)[0]

    if new is False:
        await run_in_threadpool(_must_exist, path, cleaned)
    vectors, embedder_id = await ctx.with_engine(embed)
    done = await run_in_threadpool(store, vectors, embedder_id)
    return Json({"name": done.person.name, "added": done.added, "duplicates": len(done.duplicates)},
                status_code=201 if new is not False else 200)


async def _enrol_request(request: Request, name: str | None, *, new: bool) -> Json:
    ctx = request.app.state.ctx
    ctx.require_gallery()
    form = await read_form(request, ctx.settings)
    if name is None:
        name = form.fields.get("name")
        if name is None or not name.strip():
            raise APIError(422, "missing field name (the person's name)")
    face = parse_face(form.fields.get("face"))
    from_json = is_json(request)
    images = []
    for upload in form.file_list("img"):
        data = image_bytes(upload, ctx.settings, from_json)
        pixels = decode_image(data, ctx.settings.limits.max_image_pixels, upload.label)
        images.append((upload.label, upload.filename, data, pixels))
    return await enrol_arrays(ctx, name, images, face, new=new)


@router.get("/people", summary="enrolled people and their face counts (as `streamer gallery list --json`)")
async def people(request: Request) -> Json:
    ctx = request.app.state.ctx
    path = ctx.require_gallery()

    def read() -> list[dict[str, Any]]:
        if not _exists(path):
            return []
        with _gallery(path, create=False, readonly=True) as gallery:
            return [{"name": p.name, "faces": p.faces, "negatives": p.negatives, "models": list(p.embedder_ids)}
                    for p in gallery.people()]

    return Json({"people": await run_in_threadpool(read)})


@router.post("/people", status_code=201, summary="enrol a new person (fields name, img..., face)",
             openapi_extra=_ENROL_FORM)
async def create_person(request: Request) -> Json:
    return await _enrol_request(request, None, new=True)


@router.post("/people/{name}/faces", summary="add faces to an enrolled person (fields img..., face)",
             openapi_extra=_ENROL_FORM)
async def add_faces(request: Request, name: str) -> Json:
    return await _enrol_request(request, name, new=False)


@router.patch("/people/{name}", summary="rename a person")
async def rename_person(request: Request, name: str, body: Rename) -> Json:
    ctx = request.app.state.ctx
    path = ctx.require_gallery()

    def rename() -> str:
        with ctx.gallery_lock:
            _must_exist(path, name)
            with _gallery(path, create=False) as gallery:
                if body.name.strip() != name.strip() and body.name.strip() in gallery.names():
                    raise APIError(409, f"cannot rename {name.strip()!r}: {body.name.strip()!r} already exists")
                return gallery.rename(name, body.name).name

    return Json({"name": await run_in_threadpool(rename)})


@router.delete("/people/{name}", status_code=204, summary="delete a person and erase their embeddings")
async def delete_person(request: Request, name: str) -> Response:
    ctx = request.app.state.ctx
    path = ctx.require_gallery()

    def remove() -> None:
        with ctx.gallery_lock:
            _must_exist(path, name)
            with _gallery(path, create=False) as gallery:
                gallery.remove(name)

    await run_in_threadpool(remove)
    return Response(status_code=204)
