"""What workers tell the supervisor, on two channels that never mix:

- events (PUSH -> PULL): public events, built as typed models where they are born, each with an
  internal envelope: `[meta JSON, event JSON, optional JPEG crop]`. The supervisor validates all
  three again on receipt (it is another process), stamps `seq` and publishes.
- control (PUSH -> PULL): `WorkerStats` (heartbeat numbers, progress, restart bookkeeping, the inference
  link's state) and `WorkerFatal` (a user error that ends the run with one line). Never published as events.
- frames (detect worker PUSH -> supervisor PULL): live tiles, `[LiveFrameMeta JSON, JPEG]`, only for streams
  someone watches; a small high-water mark, so a busy supervisor loses tiles, never slows the worker.

And one channel the other way:

- commands (supervisor PUSH -> detect worker PULL): `Watch`, `AddSource`, `RemoveSource`, `SetCrops`,
  validated on receipt like everything else that crosses a process boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from streamer.config import SourceSettings
from streamer.pipeline.metrics import HistogramSnapshot
from streamer.publish.events import Event, FaceEvent, parse_internal_event

MAX_CROP_BYTES = 4 * 1024 * 1024


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class EventMeta(_Message):
    decoded_at: float | None = None  # time.monotonic() of the frame's decode, for latency
    pid: int | None = None  # the sending worker's: which of the detect workers saw a pipeline.status


class StreamStats(_Message):
    fps: float = Field(ge=0)
    frames: int = Field(ge=0)
    dropped: int = Field(ge=0)
    status: Literal["connecting", "connected", "lost", "reconnected", "ended"]
    reconnects: int = Field(ge=0)
    total_frames: int | None = None
    next_track_id: int = Field(1, ge=1)
    live_frames: int = Field(0, ge=0)  # live tiles encoded and sent (nothing is encoded while nobody watches)


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


def event_frames(event: Event, decoded_at: float | None = None, crop: bytes | None = None,
                 pid: int | None = None) -> list[bytes]:
    meta = orjson.dumps({"decoded_at": decoded_at} if pid is None else {"decoded_at": decoded_at, "pid": pid})
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



# -- live tiles (detect worker -> supervisor) ---------------------------------------------------------------
MAX_LIVE_FRAME_BYTES = 8 * 1024 * 1024  # a 3840-wide JPEG at quality 90 is a few MiB at most

StreamId = Annotated[str, Field(min_length=1, max_length=100)]


class LiveFrameMeta(_Message):
    stream: StreamId
    frame: int = Field(ge=0)  # the source's frame number
    pts: float
    decoded_at: float  # time.monotonic() of the decode (one clock for every process of this machine)
    encoded_at: float


def live_frame_frames(meta: LiveFrameMeta, jpeg: bytes) -> list[bytes]:
    return [meta.model_dump_json().encode(), jpeg]


def parse_live_frame(frames: Sequence[bytes]) -> tuple[LiveFrameMeta, bytes]:
    """ValueError for anything that is not one live tile: its envelope and a JPEG of bounded size."""
    if len(frames) != 2:
        raise ValueError(f"live frame: expected 2 frames, got {len(frames)}")
    try:
        meta = LiveFrameMeta.model_validate_json(frames[0])
    except ValidationError as exc:
        raise ValueError(f"live frame envelope: {exc.errors()[0]['msg']}") from None
    jpeg = bytes(frames[1])
    if not 0 < len(jpeg) <= MAX_LIVE_FRAME_BYTES or jpeg[:2] != b"\xff\xd8":
        raise ValueError(f"live frame: not a JPEG of at most {MAX_LIVE_FRAME_BYTES >> 20} MiB")
    return meta, jpeg


# -- commands (supervisor -> detect worker) -----------------------------------------------------------------
class Watch(_Message):
    """Someone watches `stream` (render its tiles for `ttl_s` unless renewed), or nobody does any more."""

    type: Literal["watch"] = "watch"
    stream: StreamId
    active: bool = True
    # The supervisor renews a watch every second or so: a supervisor that hangs or dies cannot leave the
    # worker encoding for nobody.
    ttl_s: float = Field(5.0, gt=0, le=60)


class AddSource(_Message):
    type: Literal["add_source"] = "add_source"
    source: SourceSettings  # with its id set (the supervisor picks one when the caller did not)
    first_track_id: int = Field(1, ge=1)  # track ids of a stream never repeat within a run

    @field_validator("source")
    @classmethod
    def _has_id(cls, source: SourceSettings) -> SourceSettings:
        if source.id is None:
            raise ValueError("the source needs its stream id")
        return source


class RemoveSource(_Message):
    type: Literal["remove_source"] = "remove_source"
    stream: StreamId


class SetCrops(_Message):
    """Make face crops for identity events (a tap in the supervisor wants them; publishing them is not
    decided here: the publisher strips them unless publish.include_crops)."""

    type: Literal["set_crops"] = "set_crops"
    on: bool


Command = Annotated[Union[Watch, AddSource, RemoveSource, SetCrops], Field(discriminator="type")]
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)
MAX_COMMAND_BYTES = 64 * 1024


def command_frames(command: Watch | AddSource | RemoveSource | SetCrops) -> list[bytes]:
    return [command.model_dump_json().encode()]


def parse_command(frames: Sequence[bytes]) -> Watch | AddSource | RemoveSource | SetCrops:
    """ValueError for anything that is not one valid command."""
    if len(frames) != 1:
        raise ValueError(f"command: expected 1 frame, got {len(frames)}")
    if len(frames[0]) > MAX_COMMAND_BYTES:
        raise ValueError(f"command: {len(frames[0])} bytes, at most {MAX_COMMAND_BYTES} expected")
    try:
        return _COMMAND.validate_json(frames[0])
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ValueError(f"command: {where + ': ' if where else ''}{error['msg']}") from None


class DetectOptions(_Message):
    """How the supervisor starts a detect worker, beyond the settings."""

    commands_endpoint: str | None = None
    frames_endpoint: str | None = None
    crops: bool = False  # make face crops for identity events (see SetCrops)
    keep_running: bool = False  # `streamer serve`: idle without sources instead of exiting
    # Streams of the whole run (a detect worker holds a shard of them): output files are named per stream
    # when the run has several, whichever worker writes them. None: the worker's own sources.
    stream_count: int | None = Field(None, ge=0, le=1024)
