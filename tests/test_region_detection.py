"""Region detection between full detections (streamer.track.processor): only the tracks that want a
detection are looked for, in boxes around them; the tracker carries the others as on a predicted frame.

The detector part runs the real YuNet on the sample portrait; the schedule and the tracker use a scripted
detector (the frame index is written into the image) on a 1280x720 frame with small faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from streamer.config import Settings
from streamer.publish.events import TrackEnded, TrackStarted
from streamer.track.bytetrack import ByteTracker, box_iou
from streamer.track.processor import REGION_MIN_SIDE, StreamProcessor, region_boxes
from streamer.types import Faces, Frame

H, W = 720, 1280
PORTRAIT = Path(__file__).resolve().parents[1] / "sample_videos" / "astronaut.jpg"


def _faces(boxes: list, score: float = 0.95) -> Faces:
    landmarks = [[[x1 + 0.3 * (x2 - x1), y1 + 0.4 * (y2 - y1)], [x1 + 0.7 * (x2 - x1), y1 + 0.4 * (y2 - y1)],
                  [(x1 + x2) / 2, y1 + 0.6 * (y2 - y1)], [x1 + 0.35 * (x2 - x1), y1 + 0.8 * (y2 - y1)],
                  [x1 + 0.65 * (x2 - x1), y1 + 0.8 * (y2 - y1)]] for x1, y1, x2, y2 in boxes]
    if not boxes:
        return Faces.empty()
    return Faces(boxes=boxes, scores=[score] * len(boxes), landmarks=landmarks)


# -- the detector on regions (real YuNet) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def yunet(model_dir, cache_dir):
    from streamer.models.factory import ModelFactory

    settings = Settings(model_dir=str(model_dir), models={"cache_dir": str(cache_dir)})
    detector = ModelFactory(settings).detector(for_tracking=True)
    yield detector
    detector.close()


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """The portrait shrunk to a small face and pasted into a 720p frame (as a face across a room)."""
    portrait = cv2.imread(str(PORTRAIT))
    assert portrait is not None
    small = cv2.resize(portrait, (portrait.shape[1] * 300 // portrait.shape[0], 300), interpolation=cv2.INTER_AREA)
    frame = np.full((H, W, 3), 110, np.uint8)
    frame[200:500, 700:700 + small.shape[1]] = small
    return frame


def test_a_region_around_a_face_finds_it_as_a_full_detection_does(yunet, scene):
    full = yunet.detect(scene)
    assert len(full) >= 1
    box = full.boxes[0]
    regions = region_boxes(box[None, :], W, H)
    found = yunet.detect_regions(scene, regions)
    assert len(found) >= 1
    assert box_iou(box[None, :], found.boxes[:1])[0, 0] > 0.85
    assert abs(float(found.scores[0]) - float(full.scores[0])) < 0.1
    assert np.abs(found.landmarks[0] - full.landmarks[0]).max() < 0.1 * (box[2] - box[0])


def test_region_landmarks_match_a_full_detection_wherever_the_face_sits(yunet):
    """Crops start on the network's coarsest grid, so each output location sits where it does on the whole
    frame. On a 2-pixel grid the landmarks moved 1.5-3.6 px (median 2.4) as the face slid by a few pixels,
    enough to carry a face at the match threshold across it; on the grid 0.5-1.9 px (median 1.1)."""
    portrait = cv2.imread(str(PORTRAIT))
    small = cv2.resize(portrait, (portrait.shape[1] * 300 // portrait.shape[0], 300), interpolation=cv2.INTER_AREA)
    worst = []
    for dx in range(0, 64, 7):
        frame = np.full((H, W, 3), 110, np.uint8)
        frame[200 + dx // 2:500 + dx // 2, 600 + dx:600 + dx + small.shape[1]] = small
        full = yunet.detect(frame)
        found = yunet.detect_regions(frame, region_boxes(full.boxes[:1], W, H))
        assert len(found) >= 1, dx
        same = int(np.argmax(box_iou(full.boxes[:1], found.boxes)[0]))
        worst.append(float(np.abs(found.landmarks[same] - full.landmarks[0]).max()))
    assert np.median(worst) < 1.5 and max(worst) < 2.5, np.round(worst, 2)


def test_a_region_elsewhere_or_cutting_the_face_finds_nothing(yunet, scene):
    box = yunet.detect(scene).boxes[0]
    assert len(yunet.detect_regions(scene, np.array([[0, 0, 300, 300]], np.float64))) == 0
    # Region edges snap outwards to the network's grid (32 input pixels, 64 frame pixels here): cut the face
    # on a grid line, so the crop keeps that edge.
    grid = yunet.region_align * W / yunet.max_side
    cut = np.ceil((box[0] + 0.3 * (box[2] - box[0])) / grid) * grid
    assert cut < box[0] + 0.7 * (box[2] - box[0]), "the face is too narrow for this check"
    half = np.array([[cut, box[1] - 60, box[2] + 200, box[3] + 60]], np.float64)  # the face's right part
    assert len(yunet.detect_regions(scene, half)) == 0
    assert len(yunet.detect_regions(scene, np.zeros((0, 4)))) == 0


def test_region_boxes_grow_clip_and_merge():
    boxes = np.array([[100, 100, 140, 150], [150, 110, 190, 160], [1250, 690, 1270, 710]], np.float64)
    regions = region_boxes(boxes, W, H)
    assert len(regions) == 2  # the first two overlap once grown
    assert (regions[:, 0] >= 0).all() and (regions[:, 2] <= W).all() and (regions[:, 3] <= H).all()
    merged = regions[np.argmin(regions[:, 0])]
    assert merged[0] <= 60 and merged[2] >= 230  # each box grown by its own size on every side
    corner = regions[np.argmax(regions[:, 0])]
    assert corner[2] == W and corner[3] == H and corner[2] - corner[0] >= REGION_MIN_SIDE / 2


# -- the tracker on a region frame -----------------------------------------------------------------------
def _confirmed(tracker: ByteTracker, boxes: list, frames: int = 4) -> None:
    for i in range(frames):
        tracker.update(_faces(boxes), i, i / 30)


def test_tracks_outside_every_region_are_carried_not_missed():
    tracker = ByteTracker(min_hits=3, max_missed=5)
    a, b = [100, 100, 160, 170], [900, 300, 960, 370]
    _confirmed(tracker, [a, b])
    hits_b = int(tracker._tracks.hits[1])
    for i in range(4, 14):  # longer than max_missed: b would have ended had it been missed
        region = region_boxes(np.array([a], np.float64), W, H)
        update = tracker.update(_faces([a]), i, i / 30, regions=region)
        assert not update.ended and not update.started
        assert update.faces.track_ids.tolist() == [1]
        assert update.predicted is not None and update.predicted.track_ids.tolist() == [2]
        assert box_iou(np.array([b], np.float64), update.predicted.boxes)[0, 0] > 0.9
    assert tracker._tracks.missed.tolist() == [0, 0] and int(tracker._tracks.hits[1]) == hits_b
    # A full detection without b: now it is missed, and ends after max_missed frames.
    ended = []
    for i in range(14, 22):
        ended += tracker.update(_faces([a]), i, i / 30).ended
    assert [t.track_id for t in ended] == [2]


def test_a_detection_on_a_carried_tracks_box_starts_no_track():
    tracker = ByteTracker(min_hits=1, max_missed=5)
    a, b = [100, 100, 160, 170], [300, 100, 360, 170]
    _confirmed(tracker, [a, b])
    # The region around a reaches b's edge; b's centre is outside, and its detection must not start a track.
    region = np.array([[40, 40, 340, 230]], np.float64)
    update = tracker.update(_faces([a, [302, 101, 339, 170]]), 4, 4 / 30, regions=region)
    assert not update.started and tracker.num_tracks == 2


# -- the schedule ----------------------------------------------------------------------------------------
class RegionScript:
    """Faces per frame index; `detect_regions` returns those whose box lies inside a region. Records
    which frames were detected whole and which in regions."""

    def __init__(self, script) -> None:  # noqa: ANN001
        self.script = script
        self.full: list[int] = []
        self.regional: list[int] = []

    @staticmethod
    def _index(image: np.ndarray) -> int:
        return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])

    def detect(self, image: np.ndarray) -> Faces:
        self.full.append(self._index(image))
        return _faces(self.script(self._index(image)))

    def detect_regions(self, image: np.ndarray, regions: np.ndarray) -> Faces:
        self.regional.append(self._index(image))
        boxes = [b for b in self.script(self._index(image))
                 if any(r[0] <= b[0] and r[1] <= b[1] and b[2] <= r[2] and b[3] <= r[3] for r in regions)]
        return _faces(boxes)


def _frames(n: int):
    base = np.full((H, W, 3), 100, np.uint8)
    for i in range(n):
        image = base.copy()
        image[0, 0, 0], image[0, 0, 1] = i % 256, i // 256
        yield Frame(stream="cam", index=i, pts=i / 30, decoded_at=0.0, image=image)


def _processor(script, **detector):  # noqa: ANN001
    scripted = RegionScript(script)
    settings = Settings(detector=detector, tracker={"min_hits": 3, "max_missed": 30, "scene_cut_threshold": 0})
    prepare = lambda image, faces: {"chips": np.zeros((len(faces), 8, 8, 3), np.uint8)}  # noqa: E731
    return StreamProcessor.from_settings("cam", settings, scripted, prepare), scripted


def _still(i: int) -> list:
    return [100.0, 100.0, 160.0, 170.0]


def _walker(i: int) -> list:
    return [700.0 + 3 * i, 300.0, 760.0 + 3 * i, 370.0]


def test_a_newcomer_is_followed_in_a_region_while_the_settled_track_is_carried():
    # The newcomer enters at frame 20: the full detection that finds it is the one every max_interval.
    proc, det = _processor(lambda i: [_still(i)] + ([_walker(i)] if i >= 20 else []), max_interval=10)
    steps = [proc.process(frame) for frame in _frames(80)]
    assert det.full == list(range(0, 80, 10)), "full detections exactly every max_interval frames"
    # Young tracks (the first while it confirms, the newcomer after frame 20) are followed in regions.
    assert {1, 2, 3, 4} <= set(det.regional) and {21, 22, 23, 24} <= set(det.regional)
    assert proc.region_frames == len(det.regional) and len(det.regional) + len(det.full) < 60
    events = [e for s in steps for e in s.events]
    assert [e.track for e in events if isinstance(e, TrackStarted)] == [1, 2]
    assert not [e for e in events if isinstance(e, TrackEnded)]
    # Every frame after confirmation holds both tracks, detected or carried.
    for step in steps[25:]:
        assert sorted(step.tracked.track_ids.tolist()) == [1, 2]
    # Chips only ever come from a detection on that frame (as detected, never a carried or predicted box).
    script = lambda i: [_still(i)] + ([_walker(i)] if i >= 20 else [])  # noqa: E731
    chipped = 0
    for index, step in enumerate(steps):
        if step.chips is not None:
            chipped += 1
            assert index in det.regional or index in det.full
            for box in step.chips.boxes.tolist():
                assert box in script(index)
    assert chipped >= 2


def test_regions_off_detects_the_whole_frame_instead():
    proc, det = _processor(lambda i: [_still(i)] + ([_walker(i)] if i >= 20 else []), max_interval=10,
                           regions=False)
    for frame in _frames(60):
        proc.process(frame)
    assert not det.regional and proc.region_frames == 0 and len(det.full) > 6


def test_regions_covering_much_of_the_frame_become_a_full_detection():
    big = lambda i: [[300.0 + 2 * i, 100.0, 700.0 + 2 * i, 600.0]] if i >= 5 else []  # noqa: E731
    proc, det = _processor(big, max_interval=10)
    for frame in _frames(30):
        proc.process(frame)
    assert not det.regional and 5 < len(det.full)


def test_a_track_lost_for_longer_than_stable_hits_is_left_to_the_full_detections():
    # The walker is inferred at birth (frame 2) and gone at frame 8, before its second (warm-up) inference:
    # the gate keeps wanting it, but after stable_hits missed frames only full detections look for it.
    proc, det = _processor(lambda i: [_still(i)] + ([_walker(i)] if i < 8 else []), max_interval=10, stable_hits=5)
    steps = [proc.process(frame) for frame in _frames(60)]
    # Frames 5-7 predicted (both tracks stable); by 8 it would have walked 12 px (over 15% of its 70 px) since
    # it was last looked for, so it is looked for there: missed. Searched on 9, at the full detection at 10
    # and on 11-13 (while lost at most 5 frames), then no more.
    assert det.full == list(range(0, 60, 10))
    assert [i for i in det.regional if i > 5] == [8, 9, 11, 12, 13]
    ended = [e.track for s in steps for e in s.events if isinstance(e, TrackEnded)]
    assert ended == [2], "it still ends after max_missed frames"
