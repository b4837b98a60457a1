"""Per-track identity vote and attribute smoothing, one instance of each per stream.

A single recognition can be wrong (blur, profile, a look-alike); a track's identity is the confident
majority of its recognitions, and its attributes are averages over the track. State is a few numbers
per track (counts and sums, no history lists) and is dropped by `forget` when the track ends; an LRU
cap guards against a caller that forgets to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streamer.infer.attributes import (
    DEFAULT_MIN_EMOTION_CONFIDENCE,
    DEFAULT_MIN_EMOTION_READINGS,
    DEFAULT_MIN_GENDER_CONFIDENCE,
)
from streamer.lru import LruDict
from streamer.types import Attributes, Emotion, Gender

if TYPE_CHECKING:
    from streamer.config import AttributeSettings, RecognitionSettings

_DEFAULT_MAX_TRACKS = 10_000
_GENDER_LABELS = ("man", "woman")


@dataclass(frozen=True)
class Announcement:
    """A track's identity became confident, or its confident winner changed.

    name           winner's name, None for unknown
    score          mean match score of the winner's votes (what the matcher reported for them)
    votes          votes per known name
    unknown_votes  votes for "unknown" (kept apart so `votes` is JSON-ready with string keys)
    """

    track_id: int
    name: str | None
    score: float
    votes: dict[str, int]
    unknown_votes: int

    @property
    def total_votes(self) -> int:
        return sum(self.votes.values()) + self.unknown_votes


_NEVER = object()  # no announcement yet (None already means "unknown")


@dataclass
class _Ballot:
    counts: dict[str | None, int] = field(default_factory=dict)
    score_sums: dict[str | None, float] = field(default_factory=dict)
    announced: object = _NEVER


def _check_max_tracks(owner: str, max_tracks: int) -> None:
    if max_tracks < 1:
        raise ValueError(f"{owner}: max_tracks must be >= 1, got {max_tracks}")


class IdentityVoter:
    """Majority vote over a track's recognitions; announces when confident, again only on a change."""

    def __init__(self, min_votes: int = 2, vote_share: float = 0.6, max_tracks: int = _DEFAULT_MAX_TRACKS) -> None:
        if min_votes < 1:
            raise ValueError(f"IdentityVoter: min_votes must be >= 1, got {min_votes}")
        # Above one half, so two names can never both be confident (a tie never announces).
        if not 0.5 < vote_share <= 1.0:
            raise ValueError(f"IdentityVoter: vote_share must be in (0.5, 1], got {vote_share}")
        _check_max_tracks("IdentityVoter", max_tracks)
        self.min_votes = int(min_votes)
        self.vote_share = float(vote_share)
        self.max_tracks = int(max_tracks)
        self._ballots: LruDict[int, _Ballot] = LruDict(self.max_tracks)

    @classmethod
    def from_settings(cls, settings: RecognitionSettings) -> IdentityVoter:
        return cls(min_votes=settings.min_votes, vote_share=settings.vote_share)

    def __len__(self) -> int:
        return len(self._ballots)

    def add(self, track_id: int, name: str | None, score: float) -> Announcement | None:
        """Count one recognition of `track_id` (`name` None = unknown); return an announcement or None."""
        if not math.isfinite(score):
            raise ValueError(f"IdentityVoter.add: score must be finite, got {score}")
        track_id = int(track_id)
        ballot = self._ballots.get_or_create(track_id, _Ballot)
        ballot.counts[name] = ballot.counts.get(name, 0) + 1
        ballot.score_sums[name] = ballot.score_sums.get(name, 0.0) + float(score)

        total = sum(ballot.counts.values())
        leader, leader_votes = max(ballot.counts.items(), key=lambda item: item[1])
        if total < self.min_votes or leader_votes < self.vote_share * total:
            return None
        if ballot.announced is not _NEVER and ballot.announced == leader:
            return None
        ballot.announced = leader
        return Announcement(
            track_id=track_id,
            name=leader,
            score=ballot.score_sums[leader] / leader_votes,
            votes={k: v for k, v in ballot.counts.items() if k is not None},
            unknown_votes=ballot.counts.get(None, 0),
        )

    def forget(self, track_id: int) -> None:
        self._ballots.pop(int(track_id), None)

    def reset(self) -> None:
        self._ballots.clear()


@dataclass
class _Sums:
    # weighted sums and their total weights (a weight is 1.0 unless the caller passes, e.g., face quality)
    age_sum: float = 0.0
    age_w: float = 0.0
    man_sum: float = 0.0
    gender_w: float = 0.0
    emotion_sums: dict[str, float] = field(default_factory=dict)
    emotion_w: float = 0.0
    emotion_n: int = 0  # readings with a positive weight


def _check_confidence(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"AttributeSmoother: {name} must be in [0, 1], got {value}")
    return float(value)


class AttributeSmoother:
    """Weighted running means over a track: age averaged, gender by mean P(man), emotion by mean class
    scores; then gender / emotion are withheld (None) while the smoothed probability of the winning
    label is below min_gender_confidence / min_emotion_confidence (0 = always answer), and emotion also
    until the track has min_emotion_readings readings. The defaults are those of settings attributes.*, so
    a smoother built without settings abstains as configured."""

    def __init__(
        self,
        max_tracks: int = _DEFAULT_MAX_TRACKS,
        *,
        min_gender_confidence: float = DEFAULT_MIN_GENDER_CONFIDENCE,
        min_emotion_confidence: float = DEFAULT_MIN_EMOTION_CONFIDENCE,
        min_emotion_readings: int = DEFAULT_MIN_EMOTION_READINGS,
    ) -> None:
        _check_max_tracks("AttributeSmoother", max_tracks)
        if not (isinstance(min_emotion_readings, int) and min_emotion_readings >= 1):
            raise ValueError(f"AttributeSmoother: min_emotion_readings must be an integer >= 1, got {min_emotion_readings!r}")
        self.min_emotion_readings = min_emotion_readings
        self.max_tracks = int(max_tracks)
        self.min_gender_confidence = _check_confidence("min_gender_confidence", min_gender_confidence)
        self.min_emotion_confidence = _check_confidence("min_emotion_confidence", min_emotion_confidence)
        self._sums: LruDict[int, _Sums] = LruDict(self.max_tracks)

    @classmethod
    def from_settings(cls, settings: AttributeSettings) -> AttributeSmoother:
        return cls(
            min_gender_confidence=settings.min_gender_confidence,
            min_emotion_confidence=settings.min_emotion_confidence,
            min_emotion_readings=settings.min_emotion_readings,
        )

    def __len__(self) -> int:
        return len(self._sums)

    def add(self, track_id: int, attributes: Attributes, weight: float = 1.0) -> Attributes:
        """Fold one observation into the track with `weight` (>= 0: e.g. the face's quality, so a sharp
        frontal view outweighs a blurred profile); return the smoothed attributes (None where never
        seen with a positive weight, or below the confidence settings)."""
        gender = attributes.gender
        if gender is not None and gender.label not in _GENDER_LABELS:
            raise ValueError(f"AttributeSmoother: gender label must be one of {_GENDER_LABELS}, got {gender.label!r}")
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"AttributeSmoother.add: weight must be finite and >= 0, got {weight}")
        track_id = int(track_id)
        sums = self._sums.get_or_create(track_id, _Sums)

        if attributes.age is not None:
            sums.age_sum += weight * float(attributes.age)
            sums.age_w += weight
        if gender is not None:
            p = float(gender.probability)
            sums.man_sum += weight * (p if gender.label == "man" else 1.0 - p)
            sums.gender_w += weight
        if attributes.emotion is not None:
            # A label missing from one observation counts as probability 0 there.
            for label, value in attributes.emotion.scores.items():
                sums.emotion_sums[label] = sums.emotion_sums.get(label, 0.0) + weight * float(value)
            sums.emotion_w += weight
            sums.emotion_n += weight > 0
        return self._smoothed(sums)

    def _smoothed(self, sums: _Sums) -> Attributes:
        age = sums.age_sum / sums.age_w if sums.age_w > 0 else None
        gender = None
        if sums.gender_w > 0:
            p_man = sums.man_sum / sums.gender_w
            gender = Gender("man", p_man) if p_man >= 0.5 else Gender("woman", 1.0 - p_man)
            if gender.probability < self.min_gender_confidence:
                gender = None
        emotion = None
        if sums.emotion_w > 0 and sums.emotion_sums and sums.emotion_n >= self.min_emotion_readings:
            scores = {label: total / sums.emotion_w for label, total in sums.emotion_sums.items()}
            label = max(scores, key=scores.__getitem__)
            if scores[label] >= self.min_emotion_confidence:
                emotion = Emotion(label=label, scores=scores)
        return Attributes(age=age, gender=gender, emotion=emotion)

    def forget(self, track_id: int) -> None:
        self._sums.pop(int(track_id), None)

    def reset(self) -> None:
        self._sums.clear()
