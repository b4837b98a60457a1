"""From inference results to what a track is: gallery match, per-track vote, attribute smoothing.

One `TrackRecogniser` per stream. It is told when tracks start and end, and turns each batch of
results into typed `Identity` and `AttributesEvent`s. Results for a track that ended while its faces
were in flight are dropped: its state is gone and an event about it would contradict `track.ended`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from streamer.infer.attributes import HEADS, attributes_from_arrays
from streamer.match.matcher import Match, Matcher
from streamer.match.voting import AttributeSmoother, IdentityVoter
from streamer.publish.events import AttributesEvent, Event, Identity
from streamer.types import Attributes, rounded_box

log = logging.getLogger(__name__)


class FacesAbout(Protocol):
    """Which faces a batch of results is about (the rows of every result array, in order);
    `streamer.track.processor.ChipBatch` is one."""

    stream: str
    frame: int
    pts: float
    tracks: Sequence[int]
    boxes: np.ndarray  # (n, 4)


@dataclass(frozen=True)
class TrackState:
    """What is believed about a live track right now (for drawing and summaries)."""

    name: str | None = None
    known: bool = False
    attributes: Attributes | None = None


class TrackRecogniser:
    def __init__(
        self,
        stream_id: str,
        matcher: Matcher | None,
        voter: IdentityVoter,
        smoother: AttributeSmoother,
        *,
        include_embeddings: bool = False,
    ) -> None:
        self.stream = stream_id
        self.matcher = matcher
        self.voter = voter
        self.smoother = smoother
        self.include_embeddings = include_embeddings
        self._live: dict[int, TrackState] = {}
        self.dropped_for_ended = 0  # result rows that arrived after their track ended

    @classmethod
    def from_settings(cls, stream_id: str, settings, matcher: Matcher | None) -> TrackRecogniser:  # noqa: ANN001
        return cls(
            stream_id,
            matcher,
            IdentityVoter.from_settings(settings.recognition),
            AttributeSmoother(),
            include_embeddings=settings.publish.include_embeddings,
        )

    @property
    def tracks(self) -> Mapping[int, TrackState]:
        return self._live

    def started(self, track: int) -> None:
        self._live.setdefault(int(track), TrackState())

    def ended(self, track: int) -> None:
        track = int(track)
        self._live.pop(track, None)
        self.voter.forget(track)
        self.smoother.forget(track)

    def on_results(
        self, about: FacesAbout, arrays: Mapping[str, np.ndarray], crops: Sequence[bytes] | None = None
    ) -> list[tuple[Event, bytes | None]]:
        """Events (with the face's JPEG when crops are on) for one batch of results about `about`."""
        n = len(about.tracks)
        embeddings = arrays.get("embedding")
        matches: list[Match] | None = None
        if embeddings is not None:
            if self.matcher is not None:
                matches = self.matcher.match(embeddings)
            else:  # no gallery: every face is unknown, by definition
                matches = [Match(None, float("inf"), 0.0)] * n
        attributes = attributes_from_arrays(n, arrays) if any(h in arrays for h in HEADS) else None
        out: list[tuple[Event, bytes | None]] = []
        for row, track in enumerate(about.tracks):
            state = self._live.get(int(track))
            if state is None:
                self.dropped_for_ended += 1
                continue
            common = dict(stream=self.stream, frame=about.frame, pts=about.pts, track=int(track),
                          box=rounded_box(about.boxes[row]))
            if matches is not None:
                match = matches[row]
                log.debug("%s track %d frame %d: %s at distance %.3f", self.stream, track, about.frame,
                          match.name, match.distance)
                announcement = self.voter.add(int(track), match.name, match.score)
                if announcement is not None:
                    state = TrackState(announcement.name, announcement.name is not None, state.attributes)
                    votes = dict(announcement.votes)
                    if announcement.unknown_votes:
                        votes["unknown"] = announcement.unknown_votes
                    identity = Identity(
                        **common,
                        name=announcement.name,
                        score=round(float(announcement.score), 4),
                        distance=round(match.distance, 6) if np.isfinite(match.distance) else None,
                        votes=votes,
                        embedding=[float(v) for v in embeddings[row]] if self.include_embeddings else None,
                    )
                    out.append((identity, crops[row] if crops else None))
            if attributes is not None:
                smoothed = self.smoother.add(int(track), attributes[row])
                state = TrackState(state.name, state.known, smoothed)
                out.append((AttributesEvent(**common, **smoothed.as_dict()), None))
            self._live[int(track)] = state
        return out
