"""POST /api/v1/verify, /detect, /analyze, /represent, /find: the image commands over HTTP.

Each answer has the fields of the matching CLI command's --json output (faces in a {"faces": [...]}
object); uploads are decoded in memory and never written anywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from streamer.errors import StreamerError
from streamer.serve.errors import Json
from streamer.serve.uploads import Upload, decode_upload, is_json, read_form
from streamer.types import rounded_box

router = APIRouter(prefix="/api/v1", tags=["images"])

_ONE_IMAGE = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["img"],
                           "properties": {"img": {"type": "string", "format": "binary"}}}
            },
            "application/json": {
                "schema": {"type": "object", "required": ["img"],
                           "properties": {"img": {"type": "string", "description": "base64 image"}}}
            },
        },
    }
}
_TWO_IMAGES = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["img1", "img2"],
                           "properties": {"img1": {"type": "string", "format": "binary"},
                                          "img2": {"type": "string", "format": "binary"}}}
            },
            "application/json": {
                "schema": {"type": "object", "required": ["img1", "img2"],
                           "properties": {"img1": {"type": "string", "description": "base64 image"},
                                          "img2": {"type": "string", "description": "base64 image"}}}
            },
        },
    }
}


def relabel(exc: StreamerError, label: str) -> StreamerError:
    """The engine names an array "<array>"; the client knows the upload by its field and file name."""
    text = str(exc).replace("<array>", label).replace("--face", "the face field")
    return type(exc)(text)


def call(fn: Any, image: np.ndarray, upload: Upload, *args: Any) -> Any:
    try:
        return fn(image, *args)
    except StreamerError as exc:
        raise relabel(exc, upload.label) from None


def verify_fields(result: Any) -> dict[str, Any]:
    """`streamer verify --json`."""
    return result.fields()


async def _images(request: Request, *names: str) -> list[tuple[Upload, np.ndarray]]:
    ctx = request.app.state.ctx
    form = await read_form(request, ctx.settings)
    uploads = [form.file(name) for name in names]
    from_json = is_json(request)
    return [(u, decode_upload(u, ctx.settings, from_json)) for u in uploads]


@router.post("/verify", summary="are two faces the same person (fields img1, img2)", openapi_extra=_TWO_IMAGES)
async def verify(request: Request) -> Json:
    (up_a, img_a), (up_b, img_b) = await _images(request, "img1", "img2")

    def run(engine: Any) -> dict[str, Any]:
        a = call(engine.embed_primary, img_a, up_a)
        b = call(engine.embed_primary, img_b, up_b)
        return verify_fields(engine.compare(a, b))

    return Json(await request.app.state.ctx.with_engine(run))


@router.post("/detect", summary="faces in an image (field img)", openapi_extra=_ONE_IMAGE)
async def detect(request: Request) -> Json:
    [(upload, image)] = await _images(request, "img")

    def run(engine: Any) -> list[dict[str, Any]]:
        faces = call(engine.detect, image, upload)
        return [
            {
                "box": rounded_box(faces.boxes[i]),
                "detection_score": round(float(faces.scores[i]), 4),
                "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in faces.landmarks[i]],
            }
            for i in range(len(faces))
        ]

    return Json({"faces": await request.app.state.ctx.with_engine(run)})


@router.post("/represent", summary="embeddings of every face (field img)", openapi_extra=_ONE_IMAGE)
async def represent(request: Request) -> Json:
    [(upload, image)] = await _images(request, "img")

    def run(engine: Any) -> list[dict[str, Any]]:
        faces, embeddings = call(engine.represent, image, upload)
        return [
            {
                "box": rounded_box(faces.boxes[i]),
                "detection_score": round(float(faces.scores[i]), 4),
                "model": engine.embedder_name,
                "model_id": engine.embedder.spec.id,
                "embedding": [float(v) for v in embeddings[i]],
            }
            for i in range(len(faces))
        ]

    return Json({"faces": await request.app.state.ctx.with_engine(run)})


@router.post("/analyze", summary="age, gender and emotion of every face (field img)", openapi_extra=_ONE_IMAGE)
async def analyze(request: Request) -> Json:
    [(upload, image)] = await _images(request, "img")

    def run(engine: Any) -> list[dict[str, Any]]:
        return [
            {
                "box": list(f.box),
                "detection_score": f.detection_score,
                **{k: v for k, v in f.attributes.as_dict().items() if v is not None},
            }
            for f in call(engine.analyze, image, upload)
        ]

    return Json({"faces": await request.app.state.ctx.with_engine(run)})


@router.post("/find", summary="who is in an image, against the server's gallery (field img)",
             openapi_extra=_ONE_IMAGE)
async def find(request: Request) -> Json:
    ctx = request.app.state.ctx
    gallery = ctx.require_gallery()
    [(upload, image)] = await _images(request, "img")

    def run(engine: Any) -> list[dict[str, Any]]:
        from streamer.match.open import open_gallery

        with open_gallery(gallery, readonly=True) as opened:
            found = call(engine.find, image, upload, opened)
        return [
            {"box": list(f.box), "detection_score": f.detection_score, "name": f.name, "score": f.score,
             "distance": f.distance}
            for f in found
        ]

    return Json({"faces": await ctx.with_engine(run)})
