"""From inference results to what a track is: gallery match, per-track vote, attribute smoothing.

One `TrackRecogniser` per stream. It is told when tracks start and end, and turns each batch of
results into typed `Identity` and `AttributesEvent`s. Results for a track that ended while its faces
were in flight are dropped: its state is gone and an event about it would contradict `track.ended`.

Face quality (the gate's `face_quality`, carried by the batch) decides what votes: a chip below
`recognition.min_quality` casts no vote at all, neither for a name nor for unknown, so a few blurred or
turned-away views can neither name a track nor make a known person a stranger; its attributes still count.
Chips that vote also fold, weighted by their quality, into the track's mean embedding, which an unknown
track's identity event carries (always, between processes: the supervisor clusters strangers with it;
the publisher strips it unless `publish.include_embeddings`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from streamer.infer.attributes import HEADS, attributes_from_arrays
from streamer.lru import LruDict
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
    # (n,) face quality in (0, 1] per row, or None when not measured (every row then counts as good);
    # read with getattr, so a batch without the attribute is fine too.
    quality: np.ndarray | None


@dataclass(frozen=True)
class TrackState:
    """What is believed about a live track right now (for drawing and summaries)."""

    name: str | None = None
    known: bool = False
    attributes: Attributes | None = None


@dataclass
class _TrackEmbedding:
    """Quality-weighted running sum of a track's voting embeddings."""

    total: np.ndarray
    weight: float = 0.0
    best_quality: float = 0.0

    def add(self, embedding: np.ndarray, quality: float) -> None:
        self.total += quality * embedding
        self.weight += quality
        self.best_quality = max(self.best_quality, quality)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.weight, 1e-12)


class TrackRecogniser:
    def __init__(
        self,
        stream_id: str,
        matcher: Matcher | None,
        voter: IdentityVoter,
        smoother: AttributeSmoother,
        *,
        include_embeddings: bool = False,
        min_quality: float = 0.0,
    ) -> None:
        if not 0 <= min_quality <= 1:
            raise ValueError(f"TrackRecogniser: min_quality must be in [0, 1], got {min_quality}")
        self.stream = stream_id
        self.matcher = matcher
        self.voter = voter
        self.smoother = smoother
        self.include_embeddings = include_embeddings
        self.min_quality = float(min_quality)
        self._live: dict[int, TrackState] = {}
        self._embeddings: LruDict[int, _TrackEmbedding] = LruDict(voter.max_tracks)
        self.dropped_for_ended = 0  # result rows that arrived after their track ended
        self.withheld_for_quality = 0  # result rows below min_quality: no vote

    @classmethod
    def from_settings(cls, stream_id: str, settings, matcher: Matcher | None) -> TrackRecogniser:  # noqa: ANN001
        return cls(
            stream_id,
            matcher,
            IdentityVoter.from_settings(settings.recognition),
            AttributeSmoother.from_settings(settings.attributes),
            include_embeddings=settings.publish.include_embeddings,
            min_quality=settings.recognition.min_quality,
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
        self._embeddings.pop(track, None)

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
        quality = getattr(about, "quality", None)
        out: list[tuple[Event, bytes | None]] = []
        for row, track in enumerate(about.tracks):
            state = self._live.get(int(track))
            if state is None:
                self.dropped_for_ended += 1
                continue
            common = dict(stream=self.stream, frame=about.frame, pts=about.pts, track=int(track),
                          box=rounded_box(about.boxes[row]))
            face_quality = 1.0 if quality is None else float(quality[row])
            votes_now = face_quality >= self.min_quality
            if matches is not None and not votes_now:
                self.withheld_for_quality += 1
                log.debug("%s track %d frame %d: face quality %.3f below %.3f, no vote", self.stream, track,
                          about.frame, face_quality, self.min_quality)
            if matches is not None and votes_now:
                match = matches[row]
                log.debug("%s track %d frame %d: %s at distance %.3f (quality %.3f)", self.stream, track,
                          about.frame, match.name, match.distance, face_quality)
                mean = self._embeddings.get_or_create(
                    int(track), lambda: _TrackEmbedding(np.zeros(embeddings.shape[1], np.float64)))
                mean.add(np.asarray(embeddings[row], np.float64), max(face_quality, 1e-3))
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
                        embedding=self._embedding_for(announcement.name, embeddings[row], mean),
                        quality=round(mean.best_quality, 4) if quality is not None else None,
                    )
                    out.append((identity, crops[row] if crops else None))
            if attributes is not None:
                # A sharp frontal view says more about age and expression than a blurred profile.
                smoothed = self.smoother.add(int(track), attributes[row], weight=max(face_quality, 1e-3))
                state = TrackState(state.name, state.known, smoothed)
                out.append((AttributesEvent(**common, **smoothed.as_dict()), None))
            self._live[int(track)] = state
        return out

    def _embedding_for(self, name: str | None, row: np.ndarray, mean: _TrackEmbedding) -> list[float] | None:
        """An unknown track's mean embedding always (for the supervisor's stranger clusters); a known
        face's own only when embeddings are published."""
        if name is None:
            return [float(v) for v in mean.mean]
        return [float(v) for v in row] if self.include_embeddings else None
