"""Tracking stage: ByteTrack-style face tracks per stream, and the gate deciding which faces need inference."""

from streamer.track.bytetrack import (
    ByteTracker,
    IdCounter,
    TrackInfo,
    TrackUpdate,
    box_iou,
)
from streamer.track.gate import InferenceGate, face_quality

__all__ = [
    "ByteTracker",
    "IdCounter",
    "InferenceGate",
    "TrackInfo",
    "TrackUpdate",
    "box_iou",
    "face_quality",
]
