"""Tracker and inference gate: synthetic trajectories with known answers, then a real clip."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamer.config import RecognitionSettings, TrackerSettings
from streamer.track import ByteTracker, IdCounter, InferenceGate, face_quality, kalman
from streamer.track.bytetrack import box_iou
from streamer.track.gate import frontalness
from streamer.types import Faces, LandmarkScheme

# ----------------------------------------------------------------------------- helpers


def landmarks_for(boxes: np.ndarray, nose_shift: float = 0.0) -> np.ndarray:
    """Five frontal landmarks inside each box; `nose_shift` moves the nose sideways (fraction of width)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x1, y1 = boxes[:, 0:1], boxes[:, 1:2]
    w, h = boxes[:, 2:3] - x1, boxes[:, 3:4] - y1
    rel = np.array([[0.3, 0.4], [0.7, 0.4], [0.5 + nose_shift, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32)
    return np.stack([x1 + rel[:, 0] * w, y1 + rel[:, 1] * h], axis=2)


def faces_of(boxes, scores=None, track_ids=None, nose_shift: float = 0.0) -> Faces:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.full(len(boxes), 0.9, np.float32) if scores is None else scores
    return Faces(boxes=boxes, scores=scores, landmarks=landmarks_for(boxes, nose_shift), track_ids=track_ids)


def box_at(x: float, y: float, size: float = 60.0) -> list[float]:
    return [x, y, x + size, y + size]


def run(tracker: ByteTracker, frames: list[Faces], fps: float = 25.0):
    """Feed frames; return per-frame updates."""
    return [tracker.update(faces, i, i / fps) for i, faces in enumerate(frames)]


def ids_by_marker(updates, frames, marker_x: dict[str, callable]) -> dict[str, list[int]]:
    """Which track id each labelled synthetic face got, frame by frame (matched by exact box)."""
    out: dict[str, list[int]] = {name: [] for name in marker_x}
    for update, frame in zip(updates, frames):
        for name, which in marker_x.items():
            row = which(frame)
            if row is None:
                continue
            hit = np.flatnonzero(np.all(update.faces.boxes == frame.boxes[row], axis=1))
            if len(hit):
                out[name].append(int(update.faces.track_ids[hit[0]]))
    return out


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "kwargs",
    [
        {"low_threshold": 0.7, "high_threshold": 0.6},
        {"low_threshold": 0.0},
        {"match_iou": 0.0},
        {"match_iou": 1.0},
        {"min_hits": 0},
        {"max_missed": 0},
    ],
)
def test_tracker_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="ByteTracker"):
        ByteTracker(**kwargs)


def test_tracker_from_settings_takes_every_field():
    settings = TrackerSettings(high_threshold=0.7, low_threshold=0.2, match_iou=0.3, min_hits=2, max_missed=5)
    tracker = ByteTracker.from_settings(settings)
    assert (tracker.high_threshold, tracker.low_threshold, tracker.match_iou) == (0.7, 0.2, 0.3)
    assert (tracker.min_hits, tracker.max_missed) == (2, 5)


def test_batched_kalman_matches_the_textbook_equations():
    rng = np.random.default_rng(7)
    boxes = np.concatenate([rng.uniform(0, 500, (4, 2)), rng.uniform(0, 500, (4, 2)) + 600], axis=1)
    mean, cov = kalman.initiate(kalman.xyxy_to_xyah(boxes))
    np.testing.assert_allclose(kalman.xyah_to_xyxy(mean[:, :4]), boxes, rtol=1e-9)
    mean[:, 4:] = rng.normal(0, 3, (4, 4))
    spread = rng.normal(0, 2, (4, 8, 8))
    cov = cov + spread @ spread.transpose(0, 2, 1)  # a full covariance, as after a few updates
    pred_mean, pred_cov = kalman.predict(mean, cov)
    measured = kalman.xyxy_to_xyah(boxes + rng.normal(0, 5, boxes.shape))
    new_mean, new_cov = kalman.update(pred_mean, pred_cov, measured)
    f = np.eye(8)
    f[:4, 4:] = np.eye(4)
    h = np.eye(4, 8)
    for i in range(4):
        height = mean[i, 3]
        std = [height / 20, height / 20, 1e-2, height / 20, height / 160, height / 160, 1e-5, height / 160]
        q = np.diag(np.square(std))
        p = f @ cov[i] @ f.T + q
        np.testing.assert_allclose(pred_mean[i], f @ mean[i])
        np.testing.assert_allclose(pred_cov[i], p)
        ph = pred_mean[i, 3]
        r = np.diag(np.array([ph / 20, ph / 20, 1e-1, ph / 20]) ** 2)
        gain = p @ h.T @ np.linalg.inv(h @ p @ h.T + r)
        np.testing.assert_allclose(new_mean[i], pred_mean[i] + gain @ (measured[i] - h @ pred_mean[i]), rtol=1e-9)
        np.testing.assert_allclose(new_cov[i], (np.eye(8) - gain @ h) @ p, rtol=1e-7, atol=1e-9)


def test_box_iou_is_the_textbook_ratio_pairwise():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 25], [3, 3, 3, 9]], np.float64)  # the last has no area
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110], [3, 3, 3, 9]], np.float64)

    def iou(p, q):
        w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
        return w * h / union if union > 0 else 0.0

    np.testing.assert_array_equal(box_iou(a, b), [[iou(p, q) for q in b] for p in a])
    assert box_iou(a, np.zeros((0, 4))).shape == (3, 0)


def test_faces_keep_checking_track_ids_and_empty_faces_have_the_right_shapes():
    for scheme in LandmarkScheme:
        empty = Faces.empty(scheme)
        assert empty.boxes.shape == (0, 4) and empty.landmarks.shape == (0, scheme.num_points, 2)
        assert (empty.boxes.dtype, empty.scores.dtype, empty.track_ids.dtype) == (np.float32, np.float32, np.int64)
    faces = Faces(boxes=[[0, 0, 10, 10], [20, 20, 30, 30]], scores=[0.9, 0.8], landmarks=np.zeros((2, 5, 2)))
    assert faces.with_track_ids([4, 7]).track_ids.tolist() == [4, 7]
    with pytest.raises(ValueError, match="track_ids"):
        faces.with_track_ids([4])


# ----------------------------------------------------------------------------- synthetic trajectories


def test_two_faces_crossing_keep_their_ids():
    # A walks right, B walks left; their boxes overlap heavily for several frames around t=20.
    frames = []
    for t in range(40):
        a = box_at(100 + 10 * t, 100)
        b = box_at(500 - 10 * t, 110)
        frames.append(faces_of([a, b]))
    updates = run(ByteTracker(min_hits=3), frames)
    ids = ids_by_marker(updates, frames, {"a": lambda f: 0, "b": lambda f: 1})
    assert len(ids["a"]) == 38 and len(ids["b"]) == 38  # reported from the 3rd hit on
    assert set(ids["a"]) == {ids["a"][0]}
    assert set(ids["b"]) == {ids["b"][0]}
    assert ids["a"][0] != ids["b"][0]
    assert sum(len(u.started) for u in updates) == 2
    assert not any(u.ended for u in updates)


def test_confirmation_after_min_hits_and_spurious_detections_never_become_tracks():
    steady = [box_at(100 + 2 * t, 100) for t in range(10)]
    frames = []
    for t in range(10):
        boxes = [steady[t]]
        if t == 4:
            boxes.append(box_at(600, 400))  # one-frame false positive
        if t in (6, 7):
            boxes.append(box_at(900, 50))  # two-frame false positive
        frames.append(faces_of(boxes))
    updates = run(ByteTracker(min_hits=3), frames)
    assert [len(u.faces) for u in updates] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert [len(u.started) for u in updates] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    started = updates[2].started[0]
    assert (started.first_frame, started.last_frame, started.frames_seen) == (0, 2, 3)
    assert {int(i) for u in updates for i in u.faces.track_ids} == {started.track_id}
    assert not any(u.ended for u in updates)  # tentative tracks vanish silently


def test_face_missing_a_few_frames_keeps_its_id():
    tracker = ByteTracker(min_hits=3, max_missed=10)
    frames = [faces_of([box_at(100 + 3 * t, 200)]) if not 10 <= t < 16 else Faces.empty() for t in range(30)]
    updates = run(tracker, frames)
    seen = [int(u.faces.track_ids[0]) for u in updates if len(u.faces)]
    assert len(seen) == 30 - 2 - 6
    assert set(seen) == {seen[0]}
    assert not any(u.ended for u in updates)
    assert list(tracker.active_ids) == [seen[0]]


def test_findable_ids_are_the_tracks_seen_or_lost_within_the_window():
    tracker = ByteTracker(min_hits=1, max_missed=30)
    run(tracker, [faces_of([box_at(100, 200), box_at(400, 200)])] * 2)
    assert tracker.findable_ids(3) == [1, 2]
    for t in range(2, 8):  # the second face is gone: lost 1, 2, ... frames
        tracker.update(faces_of([box_at(100, 200)]), t, t / 25)
        assert tracker.findable_ids(3) == ([1, 2] if t - 1 <= 3 else [1])
    assert list(tracker.active_ids) == [1, 2], "not findable, still live until max_missed"


def test_a_track_found_far_from_its_prediction_is_no_longer_stable():
    tracker = ByteTracker(min_hits=1, max_missed=30)
    for t in range(6):  # 4 px a frame to the right: the filter learns the speed
        tracker.update(faces_of([box_at(100 + 4 * t, 200)]), t, t / 25)
    assert tracker.all_stable(5)
    for _ in range(3):
        tracker.predict()
    # Turned back: found 24 px left of where it was (predicted 12 px right of it), IoU with the prediction < 0.5.
    update = tracker.update(faces_of([box_at(100 + 4 * 5 - 12, 200)]), 9, 9 / 25)
    assert update.faces.track_ids.tolist() == [1] and not tracker.all_stable(5)
    # Its pace since the last look, 3 px a frame: left alone for a frame, looked for again before it has
    # moved 9 px (15% of its 60 px).
    tracker.predict()
    assert tracker.all_stable(1)
    tracker.predict()
    assert not tracker.all_stable(1)


def test_face_missing_longer_than_max_missed_ends_and_returns_with_a_new_id():
    tracker = ByteTracker(min_hits=3, max_missed=5)
    present = lambda t: t < 10 or t >= 20  # noqa: E731 - absent for 10 frames > max_missed
    frames = [faces_of([box_at(100 + 3 * t, 200)]) if present(t) else Faces.empty() for t in range(30)]
    updates = run(tracker, frames, fps=10.0)
    ended = [(i, info) for i, u in enumerate(updates) for info in u.ended]
    assert len(ended) == 1
    frame_ended, info = ended[0]
    assert frame_ended == 9 + 5 + 1  # survives max_missed misses, ends on the next one
    assert (info.first_frame, info.last_frame, info.frames_seen) == (0, 9, 10)
    assert info.duration_s == pytest.approx(0.9)
    assert info.frames_spanned == 10
    before = {int(i) for u in updates[:10] for i in u.faces.track_ids}
    after = {int(i) for u in updates[20:] for i in u.faces.track_ids}
    assert len(before) == 1 and len(after) == 1 and before != after
    assert [len(u.faces) for u in updates[20:23]] == [0, 0, 1]  # re-confirmed after min_hits again
    assert tracker.num_tracks == 1


def test_low_score_detections_keep_a_track_alive_in_stage_two():
    def frames_with(low_score: float) -> list[Faces]:
        scores = [0.9] * 5 + [low_score] * 10 + [0.9] * 5
        return [faces_of([box_at(100 + 2 * t, 100)], scores=np.array([s], np.float32)) for t, s in enumerate(scores)]

    # 0.4 is between low (0.3) and high (0.6): stage 2 continues the track, and its faces are reported.
    tracker = ByteTracker(high_threshold=0.6, low_threshold=0.3, min_hits=3, max_missed=3)
    updates = run(tracker, frames_with(0.4))
    seen = [int(u.faces.track_ids[0]) if len(u.faces) else None for u in updates]
    assert seen[2:] == [seen[2]] * 18
    assert not any(u.ended for u in updates)

    # Below low_threshold the detections are ignored: the track coasts, then ends after max_missed.
    tracker = ByteTracker(high_threshold=0.6, low_threshold=0.3, min_hits=3, max_missed=3)
    updates = run(tracker, frames_with(0.2))
    assert [len(u.faces) for u in updates[5:15]] == [0] * 10
    assert sum(len(u.ended) for u in updates) == 1


def test_low_score_detections_never_start_tracks():
    tracker = ByteTracker(min_hits=1)
    frames = [faces_of([box_at(100, 100)], scores=np.array([0.5], np.float32)) for _ in range(10)]
    updates = run(tracker, frames)
    assert tracker.num_tracks == 0
    assert not any(len(u.faces) or u.started for u in updates)


def test_landmarks_scores_and_scheme_are_carried_through():
    tracker = ByteTracker(min_hits=1)
    boxes = np.array([box_at(10, 10), box_at(300, 10), box_at(600, 10)], np.float32)
    lm = np.random.default_rng(1).uniform(0, 500, (3, 4, 2)).astype(np.float32)
    faces = Faces(boxes=boxes, scores=np.array([0.9, 0.1, 0.8], np.float32), landmarks=lm, scheme=LandmarkScheme.FOUR)
    out = tracker.update(faces, 0, 0.0).faces
    assert out.scheme is LandmarkScheme.FOUR
    np.testing.assert_array_equal(out.boxes, boxes[[0, 2]])
    np.testing.assert_array_equal(out.landmarks, lm[[0, 2]])
    np.testing.assert_array_equal(out.scores, np.array([0.9, 0.8], np.float32))
    assert len(set(out.track_ids.tolist())) == 2 and (out.track_ids >= 0).all()


def test_flush_reset_and_id_counter():
    counter = IdCounter(start=100)
    tracker = ByteTracker(min_hits=1, id_counter=counter)
    tracker.update(faces_of([box_at(0, 0), box_at(200, 0)]), 0, 0.0)
    tracker.update(faces_of([box_at(1, 0), box_at(201, 0)]), 1, 0.04)
    flushed = tracker.flush()
    assert sorted(t.track_id for t in flushed) == [100, 101]
    assert all(t.frames_seen == 2 and t.last_frame == 1 for t in flushed)
    assert tracker.num_tracks == 0 and tracker.flush() == []
    # After a reset ids keep counting: a consumer never sees an id reused on the same stream.
    update = tracker.update(faces_of([box_at(0, 0)]), 0, 0.0)
    assert [t.track_id for t in update.started] == [102]
    tracker.reset()
    assert tracker.num_tracks == 0
    # A second tracker sharing the counter draws from the same sequence.
    other = ByteTracker(min_hits=1, id_counter=counter)
    assert [t.track_id for t in other.update(faces_of([box_at(0, 0)]), 0, 0.0).started] == [103]
    assert IdCounter().next() == 1


def test_memory_is_bounded_and_ended_tracks_are_evicted():
    rng = np.random.default_rng(0)
    tracker = ByteTracker(min_hits=2, max_missed=5)
    for t in range(300):
        xy = rng.uniform(0, 1800, (8, 2))  # fresh random faces every frame: worst case churn
        tracker.update(faces_of([box_at(x, y, 40) for x, y in xy]), t, t / 25)
        assert tracker.num_tracks <= 8 * 7
    for t in range(300, 307):
        tracker.update(Faces.empty(), t, t / 25)
    assert tracker.num_tracks == 0


def test_update_is_fast_with_ten_faces():
    tracker = ByteTracker()
    rng = np.random.default_rng(0)
    base = np.stack([np.arange(10) * 150 + 20, np.full(10, 100)], 1)
    times = []
    for t in range(200):
        xy = base + 2 * t + rng.normal(0, 1, (10, 2))
        faces = faces_of([box_at(x, y, 80) for x, y in xy])
        start = time.perf_counter()
        update = tracker.update(faces, t, t / 25)
        times.append(time.perf_counter() - start)
    assert len(update.faces) == 10
    assert len({int(i) for i in update.faces.track_ids}) == 10
    assert np.median(times) < 1e-3, f"median update {np.median(times) * 1e3:.2f} ms"


# ----------------------------------------------------------------------------- inference gate


def test_gate_rejects_bad_settings():
    for kwargs in ({"refresh_s": 0}, {"max_per_track": 0}, {"better_quality_ratio": 0.9}, {"max_tracks": 0}):
        with pytest.raises(ValueError, match="InferenceGate"):
            InferenceGate(**kwargs)
    gate = InferenceGate.from_settings(RecognitionSettings(refresh_s=1.5, max_per_track=4, better_quality_ratio=1.2))
    assert (gate.refresh_s, gate.max_per_track, gate.better_quality_ratio) == (1.5, 4, 1.2)


@pytest.fixture(scope="module")
def textured_image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (720, 1280, 3), dtype=np.uint8)


def test_gate_birth_refresh_and_cap(textured_image):
    gate = InferenceGate(refresh_s=2.0, max_per_track=3, better_quality_ratio=1.3)
    faces = faces_of([box_at(100, 100), box_at(400, 100), box_at(700, 100)], track_ids=np.array([1, 2, -1]))
    assert gate.select(textured_image, faces, 0.0).tolist() == [0, 1]  # birth; untracked row ignored
    assert gate.select(textured_image, faces, 1.0).tolist() == []
    assert gate.select(textured_image, faces, 1.99).tolist() == []
    assert gate.select(textured_image, faces, 2.0).tolist() == [0, 1]  # refresh
    assert gate.select(textured_image, faces, 4.5).tolist() == [0, 1]  # 3rd inference: cap reached
    assert gate.select(textured_image, faces, 10.0).tolist() == []
    assert gate.select(textured_image, faces[[0]], 100.0).tolist() == []
    # A new track appearing later is born at once, independent of the others.
    newcomer = faces_of([box_at(100, 100), box_at(1000, 300)], track_ids=np.array([1, 7]))
    assert gate.select(textured_image, newcomer, 100.1).tolist() == [1]
    assert len(gate) == 3
    gate.forget([1, 2])
    assert len(gate) == 1
    assert gate.select(textured_image, newcomer, 100.2).tolist() == [0]  # a forgotten id starts over


def test_gate_reinfers_when_a_clearly_better_face_appears(textured_image):
    gate = InferenceGate(refresh_s=60.0, max_per_track=10, better_quality_ratio=1.3)
    ids = np.array([5])
    assert gate.select(textured_image, faces_of([box_at(100, 100, 40)], track_ids=ids), 0.0).tolist() == [0]
    # Slightly bigger: not clearly better.
    assert gate.select(textured_image, faces_of([box_at(100, 100, 42)], track_ids=ids), 0.1).tolist() == []
    # Much bigger (the person walked toward the camera): clearly better.
    assert gate.select(textured_image, faces_of([box_at(100, 100, 90)], track_ids=ids), 0.2).tolist() == [0]
    # Back to small: worse than the best, not selected; a profile of the same size neither.
    assert gate.select(textured_image, faces_of([box_at(100, 100, 40)], track_ids=ids), 0.3).tolist() == []
    profile = faces_of([box_at(100, 100, 95)], track_ids=ids, nose_shift=0.2)
    assert gate.select(textured_image, profile, 0.4).tolist() == []


def test_gate_warms_up_fast_then_refreshes_slowly(textured_image):
    gate = InferenceGate(refresh_s=2.0, warmup_count=2, warmup_refresh_s=0.25)
    ids = np.array([7])
    face = faces_of([box_at(100, 100, 40)], track_ids=ids)
    times = [i * 0.125 for i in range(40)]  # binary fractions: no rounding at the interval edges
    picked = [t for t in times if gate.select(textured_image, face, t).size]
    # Birth, one fast warm-up recognition (the second vote), then the normal interval.
    assert picked == [0.0, 0.25, 2.25, 4.25]


def test_gate_keeps_a_minimum_gap_between_better_faces(textured_image):
    gate = InferenceGate(refresh_s=60.0, better_quality_ratio=1.3, warmup_refresh_s=0.3)
    ids = np.array([5])
    gate.select(textured_image, faces_of([box_at(100, 100, 40)], track_ids=ids), 0.0)
    # A face growing fast would qualify on every frame; nothing is taken within 0.3 s of the last one.
    much_better = faces_of([box_at(100, 100, 100)], track_ids=ids)
    assert gate.select(textured_image, much_better, 0.1).tolist() == []
    assert gate.select(textured_image, much_better, 0.2).tolist() == []
    assert gate.select(textured_image, much_better, 0.3).tolist() == [0]


def test_gate_memory_is_capped_even_without_forget(textured_image):
    gate = InferenceGate(max_tracks=5)
    for tid in range(20):
        gate.select(textured_image, faces_of([box_at(10, 10)], track_ids=np.array([tid])), float(tid))
    assert len(gate) == 5


def test_frontalness_works_for_both_schemes():
    boxes = np.array([box_at(0, 0, 100)] * 3, np.float32)
    five = Faces(
        boxes=boxes,
        scores=np.ones(3),
        landmarks=np.concatenate(
            [landmarks_for(boxes[:1]), landmarks_for(boxes[:1], 0.1), landmarks_for(boxes[:1], 0.2)]
        ),
    )
    f5 = frontalness(five)
    assert f5[0] == pytest.approx(1.0) and f5[0] > f5[1] > f5[2]
    assert f5[1] == pytest.approx(0.5)  # nose moved half-way from centre to one eye
    four_lm = np.concatenate([five.landmarks[:, :3], five.landmarks[:, 3:].mean(axis=1, keepdims=True)], axis=1)
    four = Faces(boxes=boxes, scores=np.ones(3), landmarks=four_lm, scheme=LandmarkScheme.FOUR)
    np.testing.assert_allclose(frontalness(four), f5)
    # Head roll does not change it: rotate every point by 30 degrees.
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    rolled = Faces(boxes=boxes, scores=np.ones(3), landmarks=five.landmarks @ rot.T)
    np.testing.assert_allclose(frontalness(rolled), f5, atol=1e-5)


# ----------------------------------------------------------------------------- real video

VIDEO = "facenet_pytorch/examples/video.mp4"
YUNET = "face_detection_yunet_2026may.onnx"


@pytest.fixture(scope="module")
def clip_detections(media_dir: Path, model_dir: Path) -> tuple[list[np.ndarray], list[Faces]]:
    """Every frame of the real clip (1920x1080, 105 frames) and YuNet faces on a 640-wide copy, in frame pixels."""
    import av

    frames, detections = [], []
    detector = None
    with av.open(str(media_dir / VIDEO)) as container:
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="bgr24")
            h, w = image.shape[:2]
            scale = 640 / max(h, w)
            small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
            if detector is None:
                detector = cv2.FaceDetectorYN.create(
                    str(model_dir / YUNET), "", (small.shape[1], small.shape[0]), 0.6, 0.3, 5000
                )
            _, found = detector.detect(small)
            found = np.zeros((0, 15), np.float32) if found is None else found
            faces = Faces(
                boxes=np.concatenate([found[:, :2], found[:, :2] + found[:, 2:4]], axis=1),
                scores=found[:, 14],
                landmarks=found[:, 4:14].reshape(-1, 5, 2),
            ).scaled(1 / scale)
            frames.append(image)
            detections.append(faces)
    assert len(frames) == 105
    return frames, detections


def test_real_clip_tracks_are_few_long_and_stable(clip_detections):
    _, detections = clip_detections
    tracker = ByteTracker.from_settings(TrackerSettings())
    per_track: dict[int, list[tuple[int, np.ndarray]]] = {}
    started = ended = 0
    for index, faces in enumerate(detections):
        update = tracker.update(faces, index, index / 25.0)
        started += len(update.started)
        ended += len(update.ended)
        assert len(set(update.faces.track_ids.tolist())) == len(update.faces)  # one face per id per frame
        for tid, box in zip(update.faces.track_ids.tolist(), update.faces.boxes):
            per_track.setdefault(tid, []).append((index, box))
    ended += len(tracker.flush())
    assert started == ended == len(per_track)

    total_faces = sum(len(f) for f in detections)  # about 650: 6 faces per frame on average
    lengths = sorted((len(v) for v in per_track.values()), reverse=True)
    assert total_faces > 400
    assert 5 <= len(per_track) <= 25, lengths  # far fewer than one track per few detections
    assert sum(length >= 80 for length in lengths) >= 3, lengths  # people visible throughout keep one id
    assert sum(lengths) >= 0.85 * total_faces  # almost every detection belongs to a track
    # No id jumps between people: between consecutive sightings a face moves less than half its height.
    for tid, seen in per_track.items():
        for (i0, b0), (i1, b1) in zip(seen, seen[1:]):
            centre_shift = np.linalg.norm((b1[:2] + b1[2:]) / 2 - (b0[:2] + b0[2:]) / 2)
            assert centre_shift < 0.5 * (b0[3] - b0[1]) * (i1 - i0), (tid, i0, i1, centre_shift)


def test_real_clip_gate_infers_a_few_times_per_track(clip_detections):
    frames, detections = clip_detections
    tracker = ByteTracker.from_settings(TrackerSettings())
    gate = InferenceGate.from_settings(RecognitionSettings())
    tracked = 0
    inferred: dict[int, int] = {}
    for index, (image, faces) in enumerate(zip(frames, detections)):
        update = tracker.update(faces, index, index / 25.0)
        rows = gate.select(image, update.faces, index / 25.0)
        tracked += len(update.faces)
        for tid in update.faces.track_ids[rows].tolist():
            inferred[tid] = inferred.get(tid, 0) + 1
        gate.forget([t.track_id for t in update.ended])
    tracked_ids = {t for t in inferred}
    assert len(tracked_ids) >= 5
    assert all(1 <= n <= RecognitionSettings().max_per_track for n in inferred.values())
    assert sum(inferred.values()) < 0.2 * tracked  # the point of tracking: a few inferences per track


def test_real_face_quality_prefers_sharp_faces(clip_detections):
    frames, detections = clip_detections
    image, faces = frames[60], detections[60]
    sharp = face_quality(image, faces)
    blurred = face_quality(cv2.GaussianBlur(image, (0, 0), 4), faces)
    assert sharp.shape == (len(faces),) and np.all((sharp > 0) & (sharp <= 1))
    assert np.all(blurred < sharp)
    assert face_quality(image, Faces.empty()).shape == (0,)
