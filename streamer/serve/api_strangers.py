"""Strangers (/api/v1/strangers): the pipeline's clusters of unknown tracks (ids like u-17) across streams.

The same book `streamer gallery promote` asks over the admin channel (streamer.match.strangers). Listing
never returns embeddings; the thumbnail is a crop kept in memory only; promote enrols the cluster's best
vectors exactly as the CLI does (`enrol_stranger`: a content hash per vector, so a second promote adds
nothing) and then forgets the cluster, whose id is done: a running pipeline names the next sighting
within a second, once it reloads the gallery.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from streamer.errors import StreamerError
from streamer.serve.errors import APIError, Json

router = APIRouter(prefix="/api/v1", tags=["strangers"])

NO_STORE = {"Cache-Control": "no-store"}


class Promote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="a new or an enrolled person's name")


def _not_found(stranger_id: str) -> APIError:
    return APIError(404, f"no stranger {stranger_id!r} (strangers are forgotten after recognition.unknown_ttl_s; "
                         "identity events carry the current ids)")


def _public(summary: Any) -> dict[str, Any]:
    return {"id": summary.id, "tracks": summary.tracks, "streams": list(summary.streams),
            "first_seen": summary.first_seen, "last_seen": summary.last_seen, "faces": summary.faces,
            "quality": summary.best_quality, "thumbnail": summary.has_crop}


@router.get("/strangers", summary="strangers seen lately (no embeddings), the most recently seen first")
async def strangers(request: Request) -> Json:
    book = request.app.state.ctx.require_strangers()
    return Json({"strangers": [_public(s) for s in await run_in_threadpool(book.clusters)]})


@router.get("/strangers/{stranger_id}/thumbnail.jpg", summary="a stranger's best face crop (memory only)")
async def thumbnail(request: Request, stranger_id: str) -> Response:
    book = request.app.state.ctx.require_strangers()
    if book.summary(stranger_id) is None:
        raise _not_found(stranger_id)
    crop = next((f.crop for f in book.best_faces(stranger_id) if f.crop is not None), None)
    if crop is None:
        raise APIError(404, f"stranger {stranger_id!r} has no face picture (its events came without crops)")
    return Response(crop, media_type="image/jpeg", headers=NO_STORE)


@router.post("/strangers/{stranger_id}/promote", status_code=201,
             summary="enrol a stranger's best faces under a new or an enrolled name, then forget the stranger")
async def promote(request: Request, stranger_id: str, body: Promote) -> Json:
    from streamer.match.gallery import clean_name
    from streamer.match.open import open_gallery
    from streamer.match.strangers import enrol_stranger

    ctx = request.app.state.ctx
    book = ctx.require_strangers()
    path = ctx.require_gallery()
    try:
        name = clean_name(body.name)
    except StreamerError as exc:
        raise APIError(400, str(exc)) from None
    faces = [(f.embedding, f.stream) for f in book.best_faces(stranger_id)]
    if not faces:
        raise _not_found(stranger_id)

    def store() -> Any:
        with ctx.gallery_lock:
            try:
                with open_gallery(path, create=True) as gallery:
                    return enrol_stranger(gallery, name, stranger_id, faces, book.embedder_id)
            except ValueError as exc:  # e.g. the gallery holds another embedder's vectors
                raise APIError(409, f"cannot enrol stranger {stranger_id}: {exc}") from None

    done = await run_in_threadpool(store)
    book.forget(stranger_id)
    ctx.unknowns.discard_stranger(stranger_id)  # its recent unknowns are enrolled now
    return Json({"name": done.person.name, "added": done.added, "duplicates": len(done.duplicates)},
                status_code=201)


@router.delete("/strangers/{stranger_id}", status_code=204, summary="forget a stranger (its id is not reused)")
async def forget(request: Request, stranger_id: str) -> Response:
    book = request.app.state.ctx.require_strangers()
    if not book.forget(stranger_id):
        raise _not_found(stranger_id)
    return Response(status_code=204)
