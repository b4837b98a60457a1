"""What workers tell the supervisor, on two channels that never mix:

- events (PUSH -> PULL): public events, built as typed models where they are born, each with an
  internal envelope: `[meta JSON, event JSON, optional JPEG crop]`. The supervisor validates all
  three again on receipt (it is another process), stamps `seq` and publishes.
- control (PUSH -> PULL): `WorkerStats` (heartbeat numbers, progress, restart bookkeeping, the inference
  link's state) and `WorkerFatal` (a user error that ends the run with one line). Never published as events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streamer.pipeline.metrics import HistogramSnapshot
from streamer.publish.events import Event, FaceEvent, parse_internal_event

MAX_CROP_BYTES = 4 * 1024 * 1024


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class EventMeta(_Message):
    decoded_at: float | None = None  # time.monotonic() of the frame's decode, for latency


class StreamStats(_Message):
    fps: float = Field(ge=0)
    frames: int = Field(ge=0)
    dropped: int = Field(ge=0)
    status: Literal["connecting", "connected", "lost", "reconnected", "ended"]
    reconnects: int = Field(ge=0)
    total_frames: int | None = None
    next_track_id: int = Field(1, ge=1)


class WorkerStats(_Message):
    type: Literal["stats"] = "stats"
    worker: str
    streams: dict[str, StreamStats] = {}
    queues: dict[str, int] = {}
    faces_sent: int = 0
    faces_embedded: int = 0
    faces_dropped: int = 0  # faces not sent: the link was full, or inference down
    first_frame_at: float | None = None  # time.monotonic() of the first frame read
    last_frame_at: float | None = None
    inference: Literal["starting", "up", "down"] = "starting"  # the inference client's view of its worker
    inference_detail: str = Field("", max_length=2000)
    inference_ever_up: bool = False  # it answered at least once: recognition worked
    pid: int | None = None  # the sender's, so totals that restart at 0 in a new process are kept
    histograms: dict[str, HistogramSnapshot] = Field({}, max_length=16)


class WorkerFatal(_Message):
    type: Literal["fatal"] = "fatal"
    worker: str
    message: str = Field(max_length=2000)


Control = Annotated[Union[WorkerStats, WorkerFatal], Field(discriminator="type")]
_CONTROL: TypeAdapter[Control] = TypeAdapter(Control)


def control_frames(message: WorkerStats | WorkerFatal) -> list[bytes]:
    return [message.model_dump_json().encode()]


def parse_control(frames: Sequence[bytes]) -> WorkerStats | WorkerFatal:
    """ValueError for anything that is not one valid control message."""
    if len(frames) != 1:
        raise ValueError(f"control: expected 1 frame, got {len(frames)}")
    return _CONTROL.validate_json(frames[0])


def event_frames(event: Event, decoded_at: float | None = None, crop: bytes | None = None) -> list[bytes]:
    meta = orjson.dumps({"decoded_at": decoded_at})
    payload = event.payload()
    return [meta, payload] if crop is None else [meta, payload, crop]


def parse_event_frames(frames: Sequence[bytes]) -> tuple[Event, EventMeta, bytes | None]:
    """The event, its envelope and its crop; ValueError when any part is malformed."""
    if len(frames) not in (2, 3):
        raise ValueError(f"event: expected 2 or 3 frames, got {len(frames)}")
    try:
        meta = EventMeta.model_validate_json(frames[0])
    except ValidationError as exc:
        raise ValueError(f"event envelope: {exc.errors()[0]['msg']}") from None
    event = parse_internal_event(frames[1])
    crop = frames[2] if len(frames) == 3 else None
    if crop is not None:
        if not isinstance(event, FaceEvent):
            raise ValueError(f"event: a {event.kind} event cannot carry a crop")
        if not 0 < len(crop) <= MAX_CROP_BYTES or bytes(crop[:2]) != b"\xff\xd8":
            raise ValueError("event: the crop is not a JPEG of at most 4 MiB")
    return event, meta, crop

