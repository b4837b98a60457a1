"""ByteTrack-style face tracker: one per stream, Kalman prediction + two-stage IoU association.

Why two stages: a face turning away or blurring drops in detector score; instead of losing the
track, low-score detections are allowed to continue tracks that were live on the previous frame,
but never to start new ones (Zhang et al., "ByteTrack", ECCV 2022).

Life of a track: an unmatched high-score detection starts a *tentative* track; after `min_hits`
consecutive hits it is *confirmed* and gets its public id (reported in `TrackUpdate.started`).
A tentative track that misses one frame is dropped silently. A confirmed track survives up to
`max_missed` consecutive missed frames (matching again keeps its id); one more miss ends it
(reported in `TrackUpdate.ended`) and it is evicted, so memory is bounded by the live faces.

State is held as stacked arrays (structure of arrays) so prediction, IoU and Kalman correction are
one numpy call per frame for all tracks.

Frames without detection (adaptive detection, streamer.track.processor): `predict` advances the motion
model one frame and reports the live confirmed tracks at their predicted boxes. It neither hits nor misses
a track that was matched on its last detection (`min_hits` counts detections); a track already lost counts
the frame as missed, so `max_missed` stays in frames. `all_stable` says when skipping detection is safe:
every track confirmed, matched on its last detections in a row at a high score, or lost long enough that
it is more likely gone than hidden for a moment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

from streamer.track import kalman
from streamer.types import Faces, LandmarkScheme

if TYPE_CHECKING:
    from streamer.config import TrackerSettings

log = logging.getLogger(__name__)

# ByteTrack's second stage demands more overlap (its default 0.5): low-score boxes are often
# background, and only a close fit to a live track's prediction makes them trustworthy.
_LOW_SCORE_MIN_IOU = 0.5
# Between detections a track moves by its predicted speed; it is looked for again before that motion
# reaches this share of its height. A prediction that was wrong the whole way (the face turned back)
# then misses by twice that, and a box off by a third of its side still overlaps its face at IoU
# (1 - 1/3) / (1 + 1/3) = 0.5, what a low-score match needs: 1/6, rounded down. Measured, adaptive detection
# with max_interval 10: without this rule (and the restart of a surprised track's hits, in `update`) a seated
# person's head turning back during 9 predicted frames was lost (IoU 0.03) and split into a new track: 35,
# 27 and 19 tracks on the bench, Friends and Hamilton clips against 31, 21 and 17 with detection on every
# frame; with both 28, 21 and 17, and the same people named on the same frames or earlier.
_LOOK_SHIFT = 0.15
_INFEASIBLE = 1e6


class IdCounter:
    """Hands out public track ids. An object, not a global: one per stream, or shared on purpose."""

    def __init__(self, start: int = 1) -> None:
        if start < 0:
            raise ValueError(f"IdCounter: start must be >= 0 (-1 means untracked), got {start}")
        self._next = int(start)

    def next(self) -> int:
        value = self._next
        self._next += 1
        return value

    @property
    def peek(self) -> int:
        return self._next


@dataclass(frozen=True)
class TrackInfo:
    """A confirmed track as reported when it starts or ends. Frames and timestamps are of its detections."""

    track_id: int
    first_frame: int
    last_frame: int
    first_timestamp: float
    last_timestamp: float
    # frames in which a detection was matched to the track, plus the predicted frames (no detection run)
    # between two of its matched detections: what it would have been seen on with detection on every frame
    frames_seen: int
    box: tuple[float, float, float, float]  # last matched detection box, x1 y1 x2 y2

    @property
    def duration_s(self) -> float:
        return self.last_timestamp - self.first_timestamp

    @property
    def frames_spanned(self) -> int:
        return self.last_frame - self.first_frame + 1


@dataclass(frozen=True)
class TrackUpdate:
    """Result of one `ByteTracker.update`.

    faces    detections of confirmed tracks only, in detection order, track_ids set, boxes and
             landmarks as detected (not the Kalman estimate: alignment needs the real landmarks)
    started  tracks confirmed on this frame
    ended    tracks that ended on this frame (missed more than max_missed frames)
    predicted  on a frame detected only in regions: the live confirmed tracks outside every region, at
             their predicted boxes (as `predict` gives them); empty after a full detection
    """

    faces: Faces
    started: list[TrackInfo] = field(default_factory=list)
    ended: list[TrackInfo] = field(default_factory=list)
    predicted: Faces | None = None


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (M, 4) and (N, 4) x1y1x2y2 boxes -> (M, N)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    # Widths times heights written out (not np.prod/np.clip over a 2-axis): called several times a frame on a
    # few boxes, where the per-call overhead of the generic reductions is most of the cost. Same values.
    wh = np.maximum(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0.0)
    inter = wh[..., 0] * wh[..., 1]
    side_a = np.maximum(a[:, 2:] - a[:, :2], 0.0)
    side_b = np.maximum(b[:, 2:] - b[:, :2], 0.0)
    union = (side_a[:, 0] * side_a[:, 1])[:, None] + (side_b[:, 0] * side_b[:, 1])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def centres_in(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(M,) bool: whether each x1y1x2y2 box's centre lies inside any of the (N, 4) regions (edges included)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    r = np.asarray(regions, np.float64).reshape(-1, 4)
    cx = (b[:, 0] + b[:, 2]) / 2
    cy = (b[:, 1] + b[:, 3]) / 2
    return ((cx[:, None] >= r[None, :, 0]) & (cx[:, None] <= r[None, :, 2])
            & (cy[:, None] >= r[None, :, 1]) & (cy[:, None] <= r[None, :, 3])).any(axis=1)


def _assign(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment maximising IoU; pairs below `min_iou` are never matched."""
    if iou.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cost = np.where(iou >= min_iou, 1.0 - iou, _INFEASIBLE)
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] < _INFEASIBLE
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


class _Tracks:
    """Live tracks as parallel arrays (one row per track)."""

    def __init__(self) -> None:
        self.mean = np.zeros((0, 8))
        self.cov = np.zeros((0, 8, 8))
        self.track_id = np.zeros(0, np.int64)  # -1 while tentative
        self.hits = np.zeros(0, np.int64)  # consecutive matched frames
        self.missed = np.zeros(0, np.int64)  # consecutive missed frames
        self.frames_seen = np.zeros(0, np.int64)
        self.first_frame = np.zeros(0, np.int64)
        self.last_frame = np.zeros(0, np.int64)
        self.first_ts = np.zeros(0, np.float64)
        self.last_ts = np.zeros(0, np.float64)
        self.box = np.zeros((0, 4), np.float64)
        self.score = np.zeros(0, np.float64)  # detector score of the last matched detection
        self.landmarks = np.zeros((0, 0, 2), np.float64)  # of the last matched detection (K points)
        self.predicted = np.zeros(0, np.int64)  # frames predicted without detection since the last hit
        self.pace = np.zeros(0, np.float64)  # pixels a frame (centre + height) between its last two detections
        self.scheme = LandmarkScheme.FIVE

    _COLUMNS = (
        "mean", "cov", "track_id", "hits", "missed", "frames_seen",
        "first_frame", "last_frame", "first_ts", "last_ts", "box", "score", "landmarks", "predicted", "pace",
    )  # fmt: skip

    def __len__(self) -> int:
        return len(self.track_id)

    def keep(self, mask: np.ndarray) -> None:
        if mask.all():  # the common frame: nothing ended
            return
        for name in self._COLUMNS:
            setattr(self, name, getattr(self, name)[mask])

    def add(self, faces: Faces, frame_index: int, timestamp: float) -> None:
        boxes = faces.boxes
        n = len(boxes)
        if not len(self):  # the landmark count comes with the detector's scheme
            self.scheme = faces.scheme
            self.landmarks = np.zeros((0, *faces.landmarks.shape[1:]), np.float64)
        mean, cov = kalman.initiate(kalman.xyxy_to_xyah(boxes))
        new = {
            "mean": mean,
            "cov": cov,
            "track_id": np.full(n, -1, np.int64),
            "hits": np.ones(n, np.int64),
            "missed": np.zeros(n, np.int64),
            "frames_seen": np.ones(n, np.int64),
            "first_frame": np.full(n, frame_index, np.int64),
            "last_frame": np.full(n, frame_index, np.int64),
            "first_ts": np.full(n, timestamp, np.float64),
            "last_ts": np.full(n, timestamp, np.float64),
            "box": np.asarray(boxes, np.float64).reshape(n, 4),
            "score": faces.scores.astype(np.float64),
            "landmarks": faces.landmarks.astype(np.float64),
            "predicted": np.zeros(n, np.int64),
            "pace": np.zeros(n, np.float64),
        }
        for name in self._COLUMNS:
            setattr(self, name, np.concatenate([getattr(self, name), new[name]]))

    def info(self, row: int) -> TrackInfo:
        return TrackInfo(
            track_id=int(self.track_id[row]),
            first_frame=int(self.first_frame[row]),
            last_frame=int(self.last_frame[row]),
            first_timestamp=float(self.first_ts[row]),
            last_timestamp=float(self.last_ts[row]),
            frames_seen=int(self.frames_seen[row]),
            box=tuple(float(v) for v in self.box[row]),  # type: ignore[arg-type]
        )


class ByteTracker:
    """Multi-face tracker for one stream. Not thread-safe: call from the stream's own thread."""

    def __init__(
        self,
        high_threshold: float = 0.6,
        low_threshold: float = 0.3,
        match_iou: float = 0.2,
        min_hits: int = 3,
        max_missed: int = 30,
        id_counter: IdCounter | None = None,
    ) -> None:
        if not 0.0 < low_threshold < high_threshold < 1.0:
            raise ValueError(
                "ByteTracker: expected 0 < low_threshold < high_threshold < 1, "
                f"got low_threshold={low_threshold}, high_threshold={high_threshold}"
            )
        if not 0.0 < match_iou < 1.0:
            raise ValueError(f"ByteTracker: match_iou must be in (0, 1), got {match_iou}")
        if min_hits < 1:
            raise ValueError(f"ByteTracker: min_hits must be >= 1, got {min_hits}")
        if max_missed < 1:
            raise ValueError(f"ByteTracker: max_missed must be >= 1, got {max_missed}")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.match_iou = float(match_iou)
        self.min_hits = int(min_hits)
        self.max_missed = int(max_missed)
        self.ids = id_counter if id_counter is not None else IdCounter()
        self._tracks = _Tracks()

    @classmethod
    def from_settings(cls, settings: TrackerSettings, id_counter: IdCounter | None = None) -> ByteTracker:
        fields = settings.model_dump(exclude={"scene_cut_threshold"})
        return cls(**fields, id_counter=id_counter)

    @property
    def num_tracks(self) -> int:
        """Live tracks, tentative ones included (what the tracker holds in memory)."""
        return len(self._tracks)

    @property
    def active_ids(self) -> np.ndarray:
        """Public ids of live confirmed tracks (matched now or coasting through misses)."""
        ids = self._tracks.track_id
        return ids[ids >= 0].copy()

    def reset(self) -> None:
        """Forget every track without reporting it (call `flush()` first to get the ended events).

        The id counter keeps counting so that ids are never reused on this stream after a reconnect.
        """
        self._tracks = _Tracks()

    def flush(self) -> list[TrackInfo]:
        """End every live confirmed track (shutdown, end of file) and clear the tracker."""
        tracks = self._tracks
        # Frames predicted since a live track's last hit count as seen: it was there, only not detected on.
        tracks.frames_seen[tracks.missed == 0] += tracks.predicted[tracks.missed == 0]
        ended = [tracks.info(row) for row in np.flatnonzero(tracks.track_id >= 0)]
        self.reset()
        return ended

    def all_stable(self, min_hits: int) -> bool:
        """True when detection may pause: every track is confirmed and either matched on its last `min_hits`
        detections in a row (the last one at a high score) with its predicted motion since its last look
        still under _LOOK_SHIFT of its height, or lost for more than `min_hits` frames. True
        with no tracks. A tentative or recently lost track wants every frame (to confirm it, to find it
        again); one lost longer coasts until max_missed and still matches if it comes back."""
        return bool(np.all(self._settled(min_hits)))

    def _settled(self, min_hits: int) -> np.ndarray:
        """Per track: confirmed, and matched on its last `min_hits` detections (the last at a high score) and
        slow enough, or lost for more than `min_hits` frames (see all_stable)."""
        tracks = self._tracks
        seen = (tracks.hits >= min_hits) & (tracks.missed == 0) & (tracks.score >= self.high_threshold)
        # ... and not so fast that by the next frame it would have moved far from where it was last looked for
        # (see _LOOK_SHIFT): a fast face is followed more often than a still one. Speed: the filter's, or the
        # pace seen between its last two detections where that is faster (the filter takes several detections
        # to learn that a face turned back).
        v = tracks.mean
        speed = np.maximum(np.hypot(v[:, 4], v[:, 5]) + np.abs(v[:, 7]), tracks.pace)
        seen &= (tracks.predicted + 1) * speed < _LOOK_SHIFT * np.maximum(v[:, 3], 1.0)
        gone = tracks.missed > min_hits
        return (tracks.track_id >= 0) & (seen | gone)

    def predict(self) -> Faces:
        """A frame without detection: advance every track one frame; live confirmed tracks (matched on
        their last detection) at their predicted boxes, with their last score and landmarks moved along."""
        tracks = self._tracks
        self._advance()
        tracks.predicted += 1
        tracks.missed[tracks.missed > 0] += 1  # ended at the next detection once beyond max_missed
        return self._predicted_faces(np.flatnonzero((tracks.track_id >= 0) & (tracks.missed == 0)))

    def findable_ids(self, within: int) -> list[int]:
        """Public ids of the confirmed tracks matched on their last detection or lost for at most `within`
        frames: those still worth looking for between full detections (see all_stable)."""
        tracks = self._tracks
        return tracks.track_id[(tracks.track_id >= 0) & (tracks.missed <= within)].tolist()

    def unsettled_boxes(self, min_hits: int) -> np.ndarray:
        """(n, 4) current boxes of the tracks that keep `all_stable` false (tentative, young, recently lost
        or last seen at a low score): where region detection looks between full detections."""
        rows = np.flatnonzero(~self._settled(min_hits))
        return kalman.xyah_to_xyxy(self._tracks.mean[rows, :4]) if len(rows) else np.zeros((0, 4))

    def boxes_of(self, track_ids: list[int] | np.ndarray) -> np.ndarray:
        """(n, 4) current boxes of these confirmed tracks (ids not held are skipped)."""
        tracks = self._tracks
        rows = np.flatnonzero(np.isin(tracks.track_id, np.asarray(track_ids, np.int64)) & (tracks.track_id >= 0))
        return kalman.xyah_to_xyxy(tracks.mean[rows, :4]) if len(rows) else np.zeros((0, 4))

    def _predicted_faces(self, rows: np.ndarray) -> Faces:
        tracks = self._tracks
        if not len(rows):
            return Faces.empty(tracks.scheme)
        boxes = kalman.xyah_to_xyxy(tracks.mean[rows, :4])
        old = tracks.box[rows]
        # Landmarks follow the box: the same place relative to it (scaled with its size, moved with it).
        old_wh = np.maximum(old[:, 2:] - old[:, :2], 1e-6)
        scale = (boxes[:, 2:] - boxes[:, :2]) / old_wh
        landmarks = (tracks.landmarks[rows] - old[:, None, :2]) * scale[:, None, :] + boxes[:, None, :2]
        # Built from the tracker's own arrays, of known shapes: converted, not checked again.
        return Faces._of(boxes.astype(np.float32), tracks.score[rows].astype(np.float32),
                         landmarks.astype(np.float32), tracks.scheme, tracks.track_id[rows])

    def _advance(self) -> None:
        """One frame of the motion model. Lost tracks keep drifting but stop growing/shrinking (ByteTrack
        zeroes vh)."""
        tracks = self._tracks
        if len(tracks):
            mean = tracks.mean.copy()
            mean[tracks.missed > 0, 7] = 0.0
            tracks.mean, tracks.cov = kalman.predict(mean, tracks.cov)

    def update(self, faces: Faces, frame_index: int, timestamp: float,
               regions: np.ndarray | None = None) -> TrackUpdate:
        """Associate this frame's detections; each call advances the motion model by one step.

        `regions` ((n, 4) frame pixels): the frame was detected only inside these. A track whose predicted
        centre lies outside all of them was not looked for: it is carried as on a `predict` frame (neither
        hit nor missed) and reported in `TrackUpdate.predicted`, and no new track starts on its box."""
        tracks = self._tracks
        n_tracks = len(tracks)

        self._advance()
        predicted = kalman.xyah_to_xyxy(tracks.mean[:, :4]) if n_tracks else np.zeros((0, 4))
        outside = np.zeros(n_tracks, bool)
        if regions is not None and n_tracks:
            outside = ~centres_in(predicted, regions)
        looked = np.flatnonzero(~outside)

        scores = faces.scores
        high = np.flatnonzero(scores >= self.high_threshold)
        low = np.flatnonzero((scores >= self.low_threshold) & (scores < self.high_threshold))

        det_of_track = np.full(n_tracks, -1, np.int64)

        # Stage 1: high-score detections against every track looked for (confirmed, lost, tentative).
        if len(looked) and len(high):
            rows, cols = _assign(box_iou(predicted[looked], faces.boxes[high]), self.match_iou)
            det_of_track[looked[rows]] = high[cols]
        matched_high = np.zeros(len(faces), bool)
        matched_high[det_of_track[det_of_track >= 0]] = True

        # Stage 2: low-score detections only continue confirmed tracks that were live last frame.
        if n_tracks and len(low):
            candidates = np.flatnonzero(
                (det_of_track < 0) & (tracks.track_id >= 0) & (tracks.missed == 0) & ~outside
            )
            if len(candidates):
                iou = box_iou(predicted[candidates], faces.boxes[low])
                rows, cols = _assign(iou, max(self.match_iou, _LOW_SCORE_MIN_IOU))
                det_of_track[candidates[rows]] = low[cols]

        # Correct matched tracks.
        matched = np.flatnonzero(det_of_track >= 0)
        if len(matched):
            det = det_of_track[matched]
            boxes = faces.boxes[det]
            measured = kalman.xyxy_to_xyah(boxes)
            tracks.mean[matched], tracks.cov[matched] = kalman.update(
                tracks.mean[matched], tracks.cov[matched], measured
            )
            last = kalman.xyxy_to_xyah(tracks.box[matched])
            moved = np.hypot(*(measured[:, :2] - last[:, :2]).T) + np.abs(measured[:, 3] - last[:, 3])
            tracks.pace[matched] = moved / np.maximum(frame_index - tracks.last_frame[matched], 1)
            tracks.hits[matched] += 1
            # A confirmed track found far from where it was predicted (a face that turned back while
            # detection paused): its motion model is not to be trusted, so its run of hits starts again and
            # adaptive detection follows it closely until it is stable again.
            fit = np.diagonal(box_iou(predicted[matched], boxes))
            surprised = (fit < _LOW_SCORE_MIN_IOU) & (tracks.track_id[matched] >= 0)
            tracks.hits[matched[surprised]] = 1
            tracks.frames_seen[matched] += 1 + tracks.predicted[matched]
            tracks.missed[matched] = 0
            tracks.last_frame[matched] = frame_index
            tracks.last_ts[matched] = timestamp
            tracks.box[matched] = boxes
            tracks.score[matched] = faces.scores[det]
            if tracks.landmarks.shape[1:] == faces.landmarks.shape[1:]:
                tracks.landmarks[matched] = faces.landmarks[det]
        # Not looked for (outside every region): as on a predicted frame.
        tracks.predicted[outside] += 1
        tracks.missed[outside & (tracks.missed > 0)] += 1
        unmatched = (det_of_track < 0) & ~outside
        tracks.hits[unmatched] = 0
        tracks.missed[unmatched] += 1
        # Matched: counted above. Missed: the frames predicted since its last hit were not seen after all.
        tracks.predicted[~outside] = 0

        # End confirmed tracks missing too long; drop tentative ones at their first miss.
        ended_rows = np.flatnonzero(unmatched & (tracks.track_id >= 0) & (tracks.missed > self.max_missed))
        ended = [tracks.info(row) for row in ended_rows]
        alive = ~(unmatched & ((tracks.track_id < 0) | (tracks.missed > self.max_missed)))
        carried = predicted[outside & alive]
        tracks.keep(alive)
        det_of_track = det_of_track[alive]
        outside = outside[alive]

        # Unmatched high-score detections start tentative tracks (not on the box of a track not looked for).
        new = high[~matched_high[high]]
        if len(new) and len(carried):
            new = new[box_iou(carried, faces.boxes[new]).max(axis=0) < self.match_iou]
        if len(new):
            tracks.add(faces[new], frame_index, timestamp)
            det_of_track = np.concatenate([det_of_track, new])
            outside = np.concatenate([outside, np.zeros(len(new), bool)])

        # Confirm tentative tracks with enough consecutive hits.
        started = []
        for row in np.flatnonzero((tracks.track_id < 0) & (tracks.hits >= self.min_hits)):
            tracks.track_id[row] = self.ids.next()
            started.append(tracks.info(row))

        # Report detections of confirmed tracks, in detection order.
        confirmed = (det_of_track >= 0) & (tracks.track_id >= 0)
        ids = np.full(len(faces), -1, np.int64)
        ids[det_of_track[confirmed]] = tracks.track_id[confirmed]
        keep = ids >= 0
        out = faces[keep].with_track_ids(ids[keep])
        if started or ended:
            log.debug("frame %d: started %s ended %s", frame_index,
                      [t.track_id for t in started], [t.track_id for t in ended])  # fmt: skip
        carried_faces = None
        if regions is not None:
            live = (tracks.track_id >= 0) & (tracks.missed == 0)
            carried_faces = self._predicted_faces(np.flatnonzero(outside & live))
        return TrackUpdate(faces=out, started=started, ended=ended, predicted=carried_faces)
