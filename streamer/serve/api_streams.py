"""Streams (list, add, remove, live view) and recent unknowns (list, thumbnail, enrol, dismiss).

Live frames are rendered by the detect worker only while someone watches (`FrameHub.watch`), at most
serve.live_fps, downscaled to serve.live_max_width; an MJPEG response holds the watch for as long as it is
open, a snapshot for a moment.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from streamer.errors import NoFaceError
from streamer.serve.errors import APIError, Json

router = APIRouter(prefix="/api/v1", tags=["streams"])

SNAPSHOT_WAIT_S = 5.0
BOUNDARY = "frame"
NO_STORE = {"Cache-Control": "no-store"}


class AddStream(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=4096, description="file, rtsp://, http(s)://, webcam:N, lavfi:GRAPH")
    id: str | None = Field(None, description="stream id (default: the next free camN)")
    live: bool | None = Field(None, description="treat as a camera (default: from the URL)")
    fps: float | None = Field(None, description="sample a file to this rate (default: every frame)")
    loop: bool = Field(False, description="replay a file forever (demos)")


class EnrolUnknown(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="a new or an enrolled person")


def _view(view: Any) -> dict[str, Any]:
    return dataclasses.asdict(view) if dataclasses.is_dataclass(view) else dict(view)


def _stream_ids(supervisor: Any) -> set[str]:
    return {view.id for view in supervisor.streams()}


def _known_stream(request: Request, stream_id: str) -> Any:
    supervisor = request.app.state.ctx.require_supervisor()
    if stream_id not in _stream_ids(supervisor):
        raise APIError(404, f"no stream {stream_id!r} (GET /api/v1/streams lists them)")
    return supervisor


@router.get("/streams", summary="every stream with status, fps, dropped frames and reconnects")
async def streams(request: Request) -> Json:
    supervisor = request.app.state.ctx.require_supervisor()
    return Json({"streams": [_view(v) for v in supervisor.streams()]})


@router.post("/streams", status_code=201, summary="add a source at run time")
async def add_stream(request: Request, body: AddStream) -> Json:
    from streamer.config import SourceSettings

    supervisor = request.app.state.ctx.require_supervisor()
    try:
        source = SourceSettings(**body.model_dump())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "source"
        raise APIError(400, f"{where}: {str(first.get('msg', 'invalid')).removeprefix('Value error, ')}") from None
    stream_id = await run_in_threadpool(supervisor.add_source, source)
    return Json({"id": stream_id}, status_code=201)


@router.delete("/streams/{stream_id}", status_code=204, summary="remove a source (its tracks end)")
async def remove_stream(request: Request, stream_id: str) -> Response:
    supervisor = _known_stream(request, stream_id)
    await run_in_threadpool(supervisor.remove_source, stream_id)
    return Response(status_code=204)


@router.get("/streams/{stream_id}/live.mjpeg", summary="the annotated stream as MJPEG (multipart/x-mixed-replace)")
async def live(request: Request, stream_id: str) -> StreamingResponse:
    ctx = request.app.state.ctx
    supervisor = _known_stream(request, stream_id)
    hub = supervisor.frames

    async def frames() -> Any:
        with hub.watch(stream_id):
            after = 0
            latest = hub.latest(stream_id)
            if latest is not None:
                after = latest.index - 1  # show the last frame at once, then every new one
            while not ctx.stopping.is_set():
                frame = await run_in_threadpool(hub.wait_next, stream_id, after, 0.5)
                if frame is None:
                    if stream_id not in _stream_ids(supervisor):
                        break  # removed: the response ends
                    await asyncio.sleep(0.05)  # a closed hub answers at once; never spin
                    continue
                after = frame.index
                yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(frame.jpeg)}\r\n\r\n"
                       .encode() + frame.jpeg + b"\r\n")

    return StreamingResponse(frames(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                             headers={**NO_STORE, "X-Accel-Buffering": "no"})


@router.get("/streams/{stream_id}/snapshot.jpg", summary="the latest annotated frame")
async def snapshot(request: Request, stream_id: str) -> Response:
    hub = _known_stream(request, stream_id).frames

    def grab() -> Any:
        with hub.watch(stream_id):
            latest = hub.latest(stream_id)
            # A frame rendered while nobody watched is stale: wait for a fresh one, unless none comes.
            fresh = hub.wait_next(stream_id, latest.index if latest is not None else 0, SNAPSHOT_WAIT_S)
            return fresh or latest

    frame = await run_in_threadpool(grab)
    if frame is None:
        raise APIError(503, f"stream {stream_id!r} has no frame yet (is it connected?)")
    return Response(frame.jpeg, media_type="image/jpeg", headers=NO_STORE)


# -- recent unknowns ---------------------------------------------------------------------------------
MIN_DETECT_SIDE = 160  # crops of small faces are upscaled to this before detection (detectors miss tiny faces)


def _upscaled(image: Any) -> Any:
    import cv2

    side = min(image.shape[:2])
    if side >= MIN_DETECT_SIDE:
        return image
    scale = MIN_DETECT_SIDE / max(side, 1)
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)


def _unknown(request: Request, unknown_id: str) -> Any:
    found = request.app.state.ctx.unknowns.get(unknown_id)
    if found is None:
        raise APIError(404, f"no recent unknown {unknown_id!r} (it may have expired after serve.unknown_ttl_s)")
    return found


@router.get("/unknowns", summary="the last unknown tracks (memory only)")
async def unknowns(request: Request) -> Json:
    return Json({"unknowns": [u.public() for u in request.app.state.ctx.unknowns.list()]})


@router.get("/unknowns/{unknown_id}/thumbnail.jpg", summary="an unknown track's best face (memory only)")
async def thumbnail(request: Request, unknown_id: str) -> Response:
    return Response(_unknown(request, unknown_id).crop, media_type="image/jpeg", headers=NO_STORE)


@router.post("/unknowns/{unknown_id}/enrol", status_code=201,
             summary="enrol an unknown's face under a new or an enrolled name")
async def enrol_unknown(request: Request, unknown_id: str, body: EnrolUnknown) -> Json:
    from streamer.imaging import decode_image
    from streamer.serve.api_gallery import enrol_arrays

    ctx = request.app.state.ctx
    found = _unknown(request, unknown_id)
    pixels = _upscaled(decode_image(found.crop, ctx.settings.limits.max_image_pixels, f"unknown {unknown_id}"))
    # The operator saw the face and named it: no photo-quality refusal here (a video frame is what there is,
    # and the pipeline's gate already took it as good enough to recognise). The crop's margin can catch part
    # of a neighbour: the primary (largest) face is the one.
    try:
        answer = await enrol_arrays(ctx, body.name, [(f"unknown {unknown_id}", f"unknown-{unknown_id}.jpg",
                                                      found.crop, pixels)], None, new=None, checked=False)
    except NoFaceError:
        raise APIError(422, f"unknown {unknown_id}: no usable face in its picture (too small, dark or blurred "
                            "to enrol); dismiss it") from None
    ctx.unknowns.discard(unknown_id)
    return answer


@router.delete("/unknowns/{unknown_id}", status_code=204, summary="dismiss an unknown")
async def dismiss_unknown(request: Request, unknown_id: str) -> Response:
    if not request.app.state.ctx.unknowns.discard(unknown_id):
        raise APIError(404, f"no recent unknown {unknown_id!r} (it may have expired after serve.unknown_ttl_s)")
    return Response(status_code=204)
