"""One stream's frame-by-frame work: scene cut, detect, track, gate. Out come track events and the chips
that need inference; no sockets, no threads, no models of its own (the detector and the chip preparer
are handed in), so it is tested with synthetic frames.

Adaptive detection: the detector (about 8 ms a 720p frame for YuNet on one core) runs on every `interval`-th
frame while any track is new or uncertain (tentative, fewer than `stable_hits` detections in a row, missed
on its last detection, or last seen at a low score), and only every `max_interval`-th frame while every
track is stable (an empty scene included, so a newcomer waits at most `max_interval` frames). In between,
the Kalman filter predicts: such a frame still yields the tracked faces (at their predicted boxes) and the
throttled track.updated events, but no chips, unless the inference gate wants a face of a live track now
(matched on its last detection or lost for at most `stable_hits` frames), in which case that frame is
detected instead (names come as early as with detection on every frame). A
scene cut is always detected on.

Region detection (`regions`, on by default): between full detections, a frame that is due only because of
some tracks (new, uncertain, or wanted by the inference gate) is detected only in boxes around those tracks
(three times their size, overlapping ones merged), at the scale of a full detection; the other tracks are
carried by the Kalman filter as on a predicted frame. One busy track in a crowd then costs a few percent
of a full detection instead of all of it. Only when the regions would cover more than `region_max_area`
of the frame is the whole frame detected. Newcomers elsewhere are found by the full detection at least
every `max_interval` frames.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from streamer.publish.events import Event, TrackEnded, TrackEndReason, TrackStarted, TrackUpdated
from streamer.track.bytetrack import ByteTracker, IdCounter, TrackInfo, box_iou, centres_in
from streamer.track.gate import InferenceGate, face_quality
from streamer.track.scenecut import SceneCutDetector
from streamer.types import Faces, Frame, rounded_box

Prepare = Callable[[np.ndarray, Faces], Mapping[str, np.ndarray]]


class Detects(Protocol):
    """What the processor needs of a detector (streamer.detect.Detector satisfies it)."""

    def detect(self, image_bgr: np.ndarray) -> Faces: ...

    def detect_regions(self, image_bgr: np.ndarray, regions: np.ndarray) -> Faces: ...


# A region is a track's box grown by this much of its size on every side (3x as wide): room for a frame or
# two of motion and for the detector to see the face whole, with some context.
REGION_MARGIN = 1.0
REGION_MIN_SIDE = 64  # frame pixels: a face this small still gets a region the detector can work in


@dataclass(frozen=True, eq=False)
class ChipBatch:
    """Faces of one frame that need inference: their arrays plus what the results will be about."""

    stream: str
    frame: int
    pts: float
    decoded_at: float
    tracks: tuple[int, ...]
    boxes: np.ndarray  # (n, 4) float32, frame pixels
    arrays: Mapping[str, np.ndarray]  # "chips" and one crop array per attribute head, n rows each
    # (n,) float32 face quality (streamer.track.gate.face_quality) per row: the recogniser withholds votes of
    # faces below recognition.min_quality. None: not measured (every face counts).
    quality: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.tracks)
        if self.boxes.shape != (n, 4):
            raise ValueError(f"ChipBatch: boxes must be ({n}, 4), got {self.boxes.shape}")
        if self.quality is not None and self.quality.shape != (n,):
            raise ValueError(f"ChipBatch: quality must be ({n},), got {self.quality.shape}")
        for name, array in self.arrays.items():
            if len(array) != n:
                raise ValueError(f"ChipBatch: {name} has {len(array)} rows for {n} tracks")

    def __len__(self) -> int:
        return len(self.tracks)


@dataclass(frozen=True, eq=False)
class Step:
    """What one frame produced. `detections` is None on frames that were not detected on (adaptive detection);
    `tracked` then holds the live confirmed tracks at their predicted boxes (landmarks moved along)."""

    events: list[Event] = field(default_factory=list)
    chips: ChipBatch | None = None
    ended: list[int] = field(default_factory=list)  # track ids that ended (their per-track state can go)
    detections: Faces | None = None
    tracked: Faces | None = None


class StreamProcessor:
    def __init__(
        self,
        stream_id: str,
        detector: Detects,
        prepare: Prepare,
        *,
        tracker: ByteTracker,
        gate: InferenceGate,
        scene_cuts: SceneCutDetector | None = None,
        interval: int = 1,
        max_interval: int | None = None,
        stable_hits: int = 5,
        regions: bool = True,
        region_max_area: float = 0.35,
        track_update_s: float = 1.0,
    ) -> None:
        if interval < 1:
            raise ValueError(f"StreamProcessor: interval must be >= 1, got {interval}")
        if max_interval is not None and max_interval < interval:
            raise ValueError(f"StreamProcessor: max_interval must be >= interval ({interval}), got {max_interval}")
        if stable_hits < 1:
            raise ValueError(f"StreamProcessor: stable_hits must be >= 1, got {stable_hits}")
        self.stream = stream_id
        self.detector = detector
        self.prepare = prepare
        self.tracker = tracker
        self.gate = gate
        self.scene_cuts = scene_cuts
        self.interval = int(interval)
        self.max_interval = int(max_interval) if max_interval is not None else self.interval
        self.stable_hits = int(stable_hits)
        if not 0.0 < region_max_area <= 1.0:
            raise ValueError(f"StreamProcessor: region_max_area must be in (0, 1], got {region_max_area}")
        self.regions = bool(regions)
        self.region_max_area = float(region_max_area)
        self.region_frames = 0  # frames detected only in regions (counted in detected_frames too)
        self._last_full: int | None = None  # processor index of the last full-frame detection
        self.track_update_s = float(track_update_s)
        self.frames = 0
        self.detected_frames = 0  # frames the detector ran on (frames - detected_frames were predicted)
        self._last_detected: int | None = None  # processor index of the last detected frame
        self._untracked = Faces.empty()  # detections of the last detected frame that no confirmed track holds
        self.last_frame: Frame | None = None
        # The last frame's detections (all, and those of confirmed tracks), for drawing; on a predicted frame
        # the predicted tracks (plus the last detected faces that no track holds, in last_detections).
        self.last_detections: Faces | None = None
        self.last_tracked: Faces | None = None
        self._last_update: dict[int, float] = {}  # track -> pts of its last track.started/updated event

    @classmethod
    def from_settings(
        cls, stream_id: str, settings, detector: Detects, prepare: Prepare, *, first_track_id: int = 1  # noqa: ANN001
    ) -> StreamProcessor:
        """`first_track_id`: where this stream's ids start (a restarted worker continues past the old ones)."""
        threshold = settings.tracker.scene_cut_threshold
        return cls(
            stream_id,
            detector,
            prepare,
            tracker=ByteTracker.from_settings(settings.tracker, IdCounter(first_track_id)),
            gate=InferenceGate.from_settings(settings.recognition),
            scene_cuts=SceneCutDetector(threshold) if threshold > 0 else None,
            interval=settings.detector.interval,
            max_interval=settings.detector.max_interval,
            stable_hits=settings.detector.stable_hits,
            regions=settings.detector.regions,
            region_max_area=settings.detector.region_max_area,
            track_update_s=settings.publish.track_update_s,
        )

    @property
    def live_tracks(self) -> list[int]:
        return [int(t) for t in self.tracker.active_ids]

    @property
    def next_track_id(self) -> int:
        return self.tracker.ids.peek

    def process(self, frame: Frame) -> Step:
        self.last_frame = frame
        index = self.frames
        self.frames += 1
        events: list[Event] = []
        ended: list[int] = []
        cut = self.scene_cuts is not None and self.scene_cuts.is_cut(frame.image)
        if cut:
            # A new shot: the faces before the cut are gone, whatever the motion model predicts.
            self._end(self.tracker.flush(), "scene_cut", events, ended)
        plan: Literal["full"] | np.ndarray | None = "full" if cut else self._schedule(index, frame)
        if plan is None:
            faces = self.tracker.predict()
            events.extend(self._updates(frame, faces))
            # Drawn: the tracks where predicted, and faces no track holds where last detected (so that
            # output.blur_unknown still covers them).
            if not len(self._untracked):
                self.last_detections = faces
            else:
                self.last_detections = Faces.merge([faces, self._untracked]) if len(faces) else self._untracked
            self.last_tracked = faces
            return Step(events=events, tracked=faces)
        self._last_detected = index
        self.detected_frames += 1
        regions = None if isinstance(plan, str) else plan
        if regions is None:
            self._last_full = index
            detections = self.detector.detect(frame.image)
        else:
            self.region_frames += 1
            detections = self.detector.detect_regions(frame.image, regions)
        update = self.tracker.update(detections, frame.index, frame.pts, regions=regions)
        for info in update.started:
            self._last_update[info.track_id] = frame.pts
            events.append(TrackStarted(stream=self.stream, frame=frame.index, pts=frame.pts, track=info.track_id,
                                       box=rounded_box(info.box)))
        self._end(update.ended, "left", events, ended)
        faces = update.faces  # detected now: only these have landmarks fit for chips
        carried = update.predicted if update.predicted is not None else Faces.empty(faces.scheme)
        tracked = Faces.merge([faces, carried]) if len(carried) else faces
        events.extend(self._updates(frame, tracked))
        rows = self.gate.select(frame.image, faces, frame.pts)
        chips = None
        if len(rows):
            chosen = faces[rows]
            chips = ChipBatch(
                stream=self.stream,
                frame=frame.index,
                pts=frame.pts,
                decoded_at=frame.decoded_at,
                tracks=tuple(int(t) for t in chosen.track_ids),
                boxes=chosen.boxes,
                arrays=dict(self.prepare(frame.image, chosen)),
                # Measured again here (the gate keeps only each track's best): a few small crops per frame.
                quality=face_quality(frame.image, chosen),
            )
        untracked = _untracked(detections, faces)
        if regions is not None and len(self._untracked):
            # Faces no track holds, last seen outside every region, stay where they were seen (blurring).
            untracked = Faces.merge([untracked, self._untracked[~centres_in(self._untracked.boxes, regions)]])
        self._untracked = untracked
        shown = Faces.merge([detections, carried]) if len(carried) else detections
        self.last_detections, self.last_tracked = shown, tracked
        return Step(events=events, chips=chips, ended=ended, detections=shown, tracked=tracked)

    def _schedule(self, index: int, frame: Frame) -> Literal["full"] | np.ndarray | None:
        """The adaptive schedule (see the module docstring): "full", regions to detect in, or None (predict)."""
        if self._last_full is None or self._last_detected is None or index - self._last_full >= self.max_interval:
            return "full"
        if index - self._last_detected < self.interval:
            return None
        # Only confirmed live tracks can be inferred; tentative ones already make the scene unstable. A track
        # lost for more than stable_hits frames is not looked for because the gate wants it: it is more likely
        # gone than hidden (all_stable no longer waits for it either), and the next full detection finds it if
        # it is back. Looking for such tracks until max_missed cost 56 of 261 region-detected frames of the bench
        # clip (and widened others) without changing one event there or on the Hamilton and Friends clips.
        findable = self.tracker.findable_ids(self.stable_hits)
        if not self.regions:
            wanted = not self.tracker.all_stable(self.stable_hits) or self.gate.refresh_due(findable, frame.pts)
            return "full" if wanted else None
        boxes = self.tracker.unsettled_boxes(self.stable_hits)
        due = self.gate.due_tracks(findable, frame.pts)
        if due:
            boxes = np.concatenate([boxes, self.tracker.boxes_of(due)])
        if not len(boxes):
            return None
        height, width = frame.image.shape[:2]
        regions = region_boxes(boxes, width, height)
        area = float(np.sum((regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])))
        return "full" if area > self.region_max_area * width * height else regions

    def end_all(self, reason: TrackEndReason) -> Step:
        """End every live track (source lost, end of input, stop); the stream may go on afterwards."""
        events: list[Event] = []
        ended: list[int] = []
        self._end(self.tracker.flush(), reason, events, ended)
        if self.scene_cuts is not None:
            self.scene_cuts.reset()
        self._last_detected = None  # whatever comes next is detected on at once
        self._untracked = Faces.empty()
        return Step(events=events, ended=ended)

    def _updates(self, frame: Frame, faces: Faces) -> list[Event]:
        if self.track_update_s <= 0:
            return []
        out: list[Event] = []
        for row, track in enumerate(faces.track_ids.tolist()):
            last = self._last_update.get(track)
            if last is None:
                self._last_update[track] = frame.pts
            elif frame.pts - last >= self.track_update_s or frame.pts < last:  # < : the clock restarted
                self._last_update[track] = frame.pts
                out.append(TrackUpdated(stream=self.stream, frame=frame.index, pts=frame.pts, track=track,
                                        box=rounded_box(faces.boxes[row])))
        return out

    def _end(
        self, infos: list[TrackInfo], reason: TrackEndReason, events: list[Event], ended: list[int]
    ) -> None:
        for info in infos:
            events.append(
                TrackEnded(
                    stream=self.stream,
                    # about the track's last sighting, not the frame that noticed it was gone
                    frame=info.last_frame,
                    pts=info.last_timestamp,
                    track=info.track_id,
                    box=rounded_box(info.box),
                    duration=max(0.0, float(info.duration_s)),
                    frames=int(info.frames_seen),
                    reason=reason,
                )
            )
            ended.append(info.track_id)
            self._last_update.pop(info.track_id, None)
        if ended:
            self.gate.forget(ended)


def _untracked(detections: Faces, tracked: Faces) -> Faces:
    """Rows of `detections` that are not in `tracked` (the tracker reports confirmed tracks' detections as
    they were detected, so a held row has an identical box)."""
    if not len(detections) or not len(tracked):
        return detections
    held = (box_iou(detections.boxes, tracked.boxes) > 0.999).any(axis=1)
    return detections[~held]


def region_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Detection regions for these track boxes: each grown by REGION_MARGIN of its size per side (at least
    REGION_MIN_SIDE), clipped to the frame, overlapping ones merged into their bounding box until none
    overlap (a face is then never split between two regions)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    size = np.maximum(b[:, 2:] - b[:, :2], 1.0)
    grow = np.maximum(size * REGION_MARGIN, (REGION_MIN_SIDE - size) / 2)
    grown = np.concatenate([b[:, :2] - grow, b[:, 2:] + grow], axis=1)
    grown = np.clip(grown, 0, [width, height, width, height])
    regions = [row for row in grown if row[2] > row[0] and row[3] > row[1]]
    merged = True
    while merged and len(regions) > 1:
        merged = False
        for i in range(len(regions)):
            for j in range(i + 1, len(regions)):
                a, c = regions[i], regions[j]
                if a[0] < c[2] and c[0] < a[2] and a[1] < c[3] and c[1] < a[3]:
                    regions[i] = np.array([min(a[0], c[0]), min(a[1], c[1]), max(a[2], c[2]), max(a[3], c[3])])
                    del regions[j]
                    merged = True
                    break
            if merged:
                break
    return np.asarray(regions, np.float64).reshape(-1, 4)
