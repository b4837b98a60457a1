"""Publish stage: events on a ZeroMQ PUB socket, a small subscriber, and the annotated video output."""

from streamer.publish.annotate import FaceLabel, blur_faces, draw_faces
from streamer.publish.events import (
    KINDS,
    SCHEMA,
    AttributesEvent,
    EmotionInfo,
    Event,
    GenderInfo,
    Heartbeat,
    Identity,
    PipelineStatus,
    StreamHealth,
    StreamStatus,
    TrackEnded,
    TrackStarted,
    TrackUpdated,
    events_json_schema,
    parse_event,
)
from streamer.publish.publisher import EventPublisher, ZmqDefaults
from streamer.publish.subscriber import EventSubscriber, Received, print_events
from streamer.publish.video import VideoWriter

__all__ = [
    "KINDS",
    "SCHEMA",
    "AttributesEvent",
    "EmotionInfo",
    "Event",
    "EventPublisher",
    "EventSubscriber",
    "FaceLabel",
    "GenderInfo",
    "Heartbeat",
    "Identity",
    "PipelineStatus",
    "Received",
    "StreamHealth",
    "StreamStatus",
    "TrackEnded",
    "TrackStarted",
    "TrackUpdated",
    "VideoWriter",
    "ZmqDefaults",
    "blur_faces",
    "draw_faces",
    "events_json_schema",
    "parse_event",
    "print_events",
]
