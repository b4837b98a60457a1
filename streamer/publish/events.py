"""The events streamer publishes: a fixed wire contract that subscribers code against.

On the wire every event is a ZeroMQ multipart message:

    frame 0  topic    b"<kind>.<stream id>"  (UTF-8; subscribe by prefix: b"identity." or b"identity.cam1")
    frame 1  payload  one JSON object (UTF-8), the model below serialized
    frame 2  crop     JPEG bytes of the face, only when crops are enabled (payload then has "crop": true)

Every payload carries `schema`, `kind`, `seq`, `ts` and `stream`; events tied to a frame add `frame` and `pts`,
face events add `track` and `box`. `seq` is assigned by the publisher (1, 2, 3, ... per publisher), so events are
built with `seq=0` ("not yet published") and `EventPublisher.publish` stamps the real number; `parse_event`
rejects a 0 coming off the wire.

Recognition depends on the inference worker (a local process or a remote `streamer inference-worker`). When it
becomes unavailable (the worker is gone, its endpoint refuses or never answers, requests go unanswered) a
`pipeline.status` event says so, once, with a reason; another says when it is back:

    topic "pipeline.status.*"
    {"kind": "pipeline.status", "stream": "*", "inference": "down", "detail": "cannot connect to ...", ...}
    {"kind": "pipeline.status", "stream": "*", "inference": "up", "detail": "back after 4.2 s", ...}

The same kind says when the gallery file cannot be read (locked by another process, replaced by something
that is not a gallery): matching goes on with the last good copy until it is read again:

    {"kind": "pipeline.status", "stream": "*", "gallery": "stale", "detail": "... locked by another process ..."}
    {"kind": "pipeline.status", "stream": "*", "gallery": "ok", "detail": "readable again: 2 people, 3 faces"}

While it is down, tracks and stream events go on but no face is recognised. Every heartbeat repeats the state
(`inference`: "starting" until the worker first answers, then "up" or "down"; `inference_detail`: why it is
down, else "").

`embedding` (identity) and `crop` are privacy-sensitive: they are absent from the payload unless the user turned
them on, and the publisher is the one place that enforces it. (Between streamer's own processes an unknown
track's identity always carries the track's embedding: the supervisor clusters strangers with it and gives the
event its `stranger` id, "u-17", before publishing.)
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator

from streamer.types import Attributes

SCHEMA = "streamer.event/1"

# Heartbeats describe the whole publisher, not one stream; this is their `stream` (topic "heartbeat.*").
ALL_STREAMS = "*"

StreamStatusValue = Literal["connected", "lost", "reconnected", "ended"]
InferenceStatusValue = Literal["up", "down"]
# A heartbeat also knows the time before the inference worker first answered.
InferenceHealthStatus = Literal["starting", "up", "down"]
# A heartbeat can also see a stream that has not delivered its first frame yet.
StreamHealthStatus = Literal["connecting", "connected", "lost", "reconnected", "ended"]


def _plain(value: Any) -> Any:
    """numpy arrays and scalars as plain Python values, so callers can pass `faces.boxes[i]` directly."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


Box = Annotated[
    tuple[float, float, float, float],
    BeforeValidator(_plain),
    Field(description="x1, y1, x2, y2 in frame pixels"),
]
Float = Annotated[float, BeforeValidator(_plain)]
Int = Annotated[int, BeforeValidator(_plain)]
StreamId = Annotated[str, Field(min_length=1, pattern=r"^[^\s.]+$", description="stream id (no dots or spaces)")]


def _seq_on_wire(schema: dict[str, Any]) -> None:
    # seq 0 only exists before publishing; on the wire it starts at 1 and is always present.
    schema["minimum"] = 1
    schema.pop("default", None)


class EventBase(BaseModel):
    """Fields every payload carries."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        # The exported schema describes what is on the wire, where defaulted fields are always present.
        json_schema_serialization_defaults_required=True,
        populate_by_name=True,
        allow_inf_nan=False,  # JSON has no NaN: it would go out as null and fail validation at the subscriber
    )

    # Fields that are left out of the payload when unset; not "required" in the exported schema.
    OPTIONAL_ON_WIRE: ClassVar[tuple[str, ...]] = ()

    schema_: Literal["streamer.event/1"] = Field(SCHEMA, alias="schema", description="payload schema name/version")
    kind: str
    seq: int = Field(
        0,
        ge=0,
        description="per publisher: 1, 2, 3, ... one per message; a jump means messages were lost",
        json_schema_extra=_seq_on_wire,
    )
    ts: float = Field(default_factory=time.time, description="wall clock, unix seconds")
    stream: StreamId

    @property
    def topic(self) -> bytes:
        return f"{self.kind}.{self.stream}".encode()

    def payload(self) -> bytes:
        """The JSON payload: fields that may be absent on the wire (crop, embedding) are left out when None."""
        absent = {name for name in self.OPTIONAL_ON_WIRE if getattr(self, name) is None}
        return self.__pydantic_serializer__.to_json(self, by_alias=True, exclude=absent or None)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        if cls.OPTIONAL_ON_WIRE and "required" in target:
            target["required"] = [n for n in target["required"] if n not in cls.OPTIONAL_ON_WIRE]
        return schema


# Fields are required unless the wire contract says they may be missing; "name or null" style fields are
# required-and-nullable, so a subscriber never has to guess whether absent means unknown.
class FrameEvent(EventBase):
    frame: Int = Field(ge=0, description="0-based index of the frame in its stream")
    pts: Float = Field(description="stream timestamp of the frame, seconds")


class FaceEvent(FrameEvent):
    OPTIONAL_ON_WIRE: ClassVar[tuple[str, ...]] = ("crop",)

    track: Int = Field(ge=0, description="track id, unique within the stream")
    box: Box
    crop: bool | None = Field(
        None,
        description="present (true) only when crops are enabled: the message has a 3rd frame with a JPEG crop",
    )


class StreamStatus(EventBase):
    kind: Literal["stream.status"] = "stream.status"
    status: StreamStatusValue
    detail: str = ""


class PipelineStatus(EventBase):
    """A change of a part every stream depends on: the inference worker (recognition) or the gallery.

    Exactly one of `inference` and `gallery` is set: each event reports one change.
    """

    OPTIONAL_ON_WIRE: ClassVar[tuple[str, ...]] = ("inference", "gallery")

    kind: Literal["pipeline.status"] = "pipeline.status"
    stream: StreamId = ALL_STREAMS
    inference: InferenceStatusValue | None = Field(
        None, description="down: no face is recognised until it is up again (tracks go on); up: recognition works"
    )
    gallery: Literal["ok", "stale"] | None = Field(
        None,
        description="stale: the gallery file cannot be read (locked, replaced by something else, deleted); "
        "matching goes on with the last good copy; ok: read again",
    )
    detail: str = Field("", description="why it is down or stale (with what to check), or how long it lasted")

    @model_validator(mode="after")
    def _one_change(self) -> PipelineStatus:
        if (self.inference is None) == (self.gallery is None):
            raise ValueError("pipeline.status: expected exactly one of inference and gallery")
        return self


class TrackStarted(FaceEvent):
    kind: Literal["track.started"] = "track.started"


class TrackUpdated(FaceEvent):
    """Sent at most every `publish.track_update_s` per track."""

    kind: Literal["track.updated"] = "track.updated"


TrackEndReason = Literal["left", "scene_cut", "source_lost", "end_of_input", "stopped", "worker_restart"]


class TrackEnded(FaceEvent):
    kind: Literal["track.ended"] = "track.ended"
    duration: Float = Field(ge=0, description="seconds from first to last sighting (stream clock)")
    frames: int | None = Field(
        ge=0, description="frames in which the track was seen; null when the worker that counted them died"
    )
    reason: TrackEndReason = Field(
        "left",
        description="left: not seen for tracker.max_missed frames; scene_cut: a shot cut; source_lost: the "
        "source disconnected; end_of_input: the file ended; stopped: streamer was stopped; worker_restart: "
        "the detect worker died and was restarted",
    )


class Identity(FaceEvent):
    OPTIONAL_ON_WIRE: ClassVar[tuple[str, ...]] = ("crop", "embedding")

    kind: Literal["identity"] = "identity"
    name: str | None = Field(description="gallery name, or null for an unknown face")
    score: Float = Field(description="confidence of the decision in [0, 1]")
    distance: Float | None = Field(
        description="embedding distance to the best gallery match; null when the gallery is empty"
    )
    votes: dict[str, int] = Field(description='recognitions of this track per name ("unknown" for no match)')
    embedding: list[float] | None = Field(
        None,
        max_length=4096,
        description="face embedding, present only when embeddings are enabled (for an unknown track: the "
        "track's quality-weighted mean)",
    )
    quality: Float | None = Field(
        None, ge=0, le=1,
        description="face quality (size x frontalness x sharpness, 0..1) of the best face that voted; null when not "
        "measured",
    )
    stranger: str | None = Field(
        None,
        pattern=r"^u-[1-9][0-9]{0,9}$",
        description='for an unknown face: its stranger id ("u-17"), the same whenever this stranger comes back, '
        "on any stream of this run; null for a known face or when no id was given",
    )


class GenderInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    label: Literal["man", "woman"]
    probability: Float = Field(ge=0, le=1)


class EmotionInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    label: str
    scores: dict[str, float]


class AttributesEvent(FaceEvent):
    """Smoothed over the track: age averaged, gender and emotion by probability."""

    kind: Literal["attributes"] = "attributes"
    age: Annotated[float, Field(ge=0), BeforeValidator(_plain)] | None = Field(
        description="years, or null when not estimated"
    )
    gender: GenderInfo | None
    emotion: EmotionInfo | None

    @classmethod
    def from_attributes(cls, attributes: Attributes, **fields: Any) -> AttributesEvent:
        """Build from the pipeline's `Attributes` value plus the stream/frame/track fields."""
        gender = attributes.gender
        emotion = attributes.emotion
        return cls(
            age=attributes.age,
            gender=None if gender is None else GenderInfo(label=gender.label, probability=gender.probability),
            emotion=None if emotion is None else EmotionInfo(label=emotion.label, scores=dict(emotion.scores)),
            **fields,
        )


class StreamHealth(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    fps: Float = Field(ge=0)
    frames: int = Field(ge=0)
    dropped: int = Field(ge=0)
    status: StreamHealthStatus
    reconnects: int = Field(ge=0)


class Heartbeat(EventBase):
    kind: Literal["heartbeat"] = "heartbeat"
    stream: StreamId = ALL_STREAMS
    streams: dict[str, StreamHealth]
    queues: dict[str, int] = Field(description="queue name -> current depth")
    uptime: Float = Field(ge=0, description="seconds since start")
    inference: InferenceHealthStatus = Field(
        "starting", description="the inference worker: starting (not answered yet), up or down (see pipeline.status)"
    )
    inference_detail: str = Field("", description="why inference is down; empty otherwise")


Event = Annotated[
    Union[StreamStatus, PipelineStatus, TrackStarted, TrackUpdated, TrackEnded, Identity, AttributesEvent, Heartbeat],
    Field(discriminator="kind"),
]
EVENT_TYPES: tuple[type[EventBase], ...] = (
    StreamStatus,
    PipelineStatus,
    TrackStarted,
    TrackUpdated,
    TrackEnded,
    Identity,
    AttributesEvent,
    Heartbeat,
)
KINDS: tuple[str, ...] = tuple(t.model_fields["kind"].default for t in EVENT_TYPES)

_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


class WireMessage(NamedTuple):
    """One event as its ZeroMQ frames."""

    topic: bytes
    payload: bytes
    crop: bytes | None = None

    @property
    def frames(self) -> list[bytes]:
        return [self.topic, self.payload] if self.crop is None else [self.topic, self.payload, self.crop]


def parse_event(topic: bytes, payload: bytes) -> Event:
    """Validate one received message. Raises ValueError (pydantic's ValidationError is one) when it is not a
    valid event or the topic does not match the payload's kind and stream."""
    event = _ADAPTER.validate_json(payload)
    if event.seq < 1:
        raise ValueError(f"seq: expected >= 1 on the wire, got {event.seq}")
    if topic != event.topic:
        raise ValueError(f"topic: expected {event.topic!r} for this payload, got {topic!r}")
    return event


def parse_internal_event(payload: bytes) -> Event:
    """Validate an event that has not been published yet (between streamer's own processes: `seq` 0)."""
    event = _ADAPTER.validate_json(payload)
    if event.seq != 0:
        raise ValueError(f"seq: an unpublished event has seq 0, got {event.seq}")
    return event


def events_json_schema() -> dict[str, Any]:
    """JSON Schema of the payload union, as it appears on the wire (`streamer events schema`)."""
    schema = _ADAPTER.json_schema(mode="serialization", by_alias=True)
    schema["title"] = "streamer event"
    schema["description"] = (
        f"Payload (frame 1) of a streamer ZeroMQ event, schema {SCHEMA!r}. Topic (frame 0) is '<kind>.<stream>'."
    )
    return schema
