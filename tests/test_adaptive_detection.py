"""Adaptive detection in the per-stream processor: every frame while a track is new or uncertain, every
`detector.max_interval`-th frame while all are stable, the Kalman filter in between.

A scripted detector answers by frame (the frame index is written into the image), so a skipped frame
does not shift the script; no model is needed for the schedule itself."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.config import Settings, load_settings
from streamer.errors import ConfigError
from streamer.publish.events import TrackEnded, TrackStarted, TrackUpdated
from streamer.track.bytetrack import ByteTracker
from streamer.track.gate import InferenceGate
from streamer.track.processor import StreamProcessor
from streamer.types import Faces, Frame

H, W = 240, 320
Box = tuple[float, float, float, float]


def face(box: Box, score: float = 0.95) -> tuple[Box, float]:
    return box, score


def walking(i: int, start: float = 40.0, speed: float = 2.0) -> Box:
    return (start + speed * i, 60.0, start + speed * i + 80, 160.0)


class FrameScript:
    """Faces per frame index (read back from the image), and which frames it was asked about."""

    def __init__(self, script) -> None:  # noqa: ANN001  (frame index -> list of (box, score))
        self.script = script
        self.asked: list[int] = []

    def detect(self, image: np.ndarray) -> Faces:
        index = int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])
        self.asked.append(index)
        rows = self.script(index)
        if not rows:
            return Faces.empty()
        boxes = [b for b, _ in rows]
        landmarks = [[[x1 + 0.3 * (x2 - x1), y1 + 0.4 * (y2 - y1)], [x1 + 0.7 * (x2 - x1), y1 + 0.4 * (y2 - y1)],
                      [(x1 + x2) / 2, y1 + 0.6 * (y2 - y1)], [x1 + 0.35 * (x2 - x1), y1 + 0.8 * (y2 - y1)],
                      [x1 + 0.65 * (x2 - x1), y1 + 0.8 * (y2 - y1)]] for x1, y1, x2, y2 in boxes]
        return Faces(boxes=boxes, scores=[s for _, s in rows], landmarks=landmarks)


def prepare(image: np.ndarray, faces: Faces) -> dict[str, np.ndarray]:
    return {"chips": np.zeros((len(faces), 8, 8, 3), np.uint8)}


def frames(n: int, start: int = 0, fps: float = 30.0):
    rng = np.random.default_rng(0)
    base = np.clip(np.full((H, W, 3), (90, 120, 150), np.int16) + rng.integers(-8, 8, (H, W, 3)), 0, 255)
    for i in range(start, start + n):
        image = base.astype(np.uint8)
        image[0, 0, 0], image[0, 0, 1] = i % 256, i // 256
        yield Frame(stream="cam", index=i, pts=i / fps, decoded_at=0.0, image=image)


def processor(script, **detector) -> tuple[StreamProcessor, FrameScript]:  # noqa: ANN001
    scripted = FrameScript(script)
    settings = Settings(detector=detector, tracker={"min_hits": 3, "max_missed": 30, "scene_cut_threshold": 0})
    return StreamProcessor.from_settings("cam", settings, scripted, prepare), scripted


def run(proc: StreamProcessor, n: int, start: int = 0) -> list:
    return [proc.process(frame) for frame in frames(n, start)]


# -- the schedule ----------------------------------------------------------------------------------------
def test_max_interval_1_detects_every_frame_and_the_default_adapts():
    proc, det = processor(lambda i: [face(walking(i))], max_interval=1)
    run(proc, 60)
    assert det.asked == list(range(60)) and proc.detected_frames == 60
    assert Settings().detector.max_interval == 10
    proc, det = processor(lambda i: [face(walking(i, speed=0.0))])
    run(proc, 60)
    assert proc.detected_frames < 30 and max(np.diff(det.asked)) == 10


def test_stable_track_is_detected_every_max_interval_frames_and_predicted_in_between():
    proc, det = processor(lambda i: [face(walking(i))], max_interval=4, stable_hits=5)
    steps = run(proc, 120)
    # Born at frame 2 (min_hits 3), stable at 4; later detections only when due: every 4th frame, or when
    # the inference gate wants this track again (warm-up 0.3 s, then every 2 s).
    assert det.asked[:5] == [0, 1, 2, 3, 4] and det.asked[5] > 5
    gaps = np.diff(det.asked)
    assert gaps.max() == 4 and (gaps >= 1).all()
    assert proc.detected_frames == len(det.asked) < 40  # about a quarter of 120
    for index, step in enumerate(steps[5:], start=5):
        assert step.tracked is not None and step.tracked.track_ids.tolist() == [1], index
        if index in det.asked:
            assert step.detections is not None
            continue
        # A predicted frame: no detections, no chips, the track where the face really is (constant speed).
        assert step.detections is None and step.chips is None
        # (within 3 px of an 80 px face: the speed is still being learnt on the first predicted frames)
        assert np.abs(step.tracked.boxes[0] - np.asarray(walking(index))).max() < 3.0, index
        assert step.tracked.landmarks.shape == (1, 5, 2)
    assert proc.last_tracked is steps[-1].tracked  # what the worker draws


def test_a_fast_face_is_looked_for_more_often_and_keeps_its_track_when_it_turns_back():
    # 6 px a frame, then back: predicted for 10 frames it would be 100 px off (more than its width) when it
    # turns. Looked for before its predicted motion reaches 15% of its height (100 px), it stays one track.
    def pacing(i: int) -> Box:
        x = 40.0 + 6 * (i if i < 40 else 80 - i)
        return (x, 60.0, x + 80, 160.0)

    proc, det = processor(lambda i: [face(pacing(i))], max_interval=10, regions=False)
    steps = run(proc, 80)
    started = [e.track for s in steps for e in s.events if isinstance(e, TrackStarted)]
    assert started == [1] and not [e for s in steps for e in s.events if isinstance(e, TrackEnded)]
    assert max(np.diff(det.asked)) <= 4 and len(det.asked) < 50


def test_interval_keeps_its_meaning_when_max_interval_is_unset():
    proc, det = processor(lambda i: [face(walking(i))], interval=3, max_interval=None)
    run(proc, 30)
    assert det.asked == list(range(0, 30, 3))


def test_new_face_is_detected_every_frame_until_its_track_is_stable():
    # One stable face; a second appears at frame 40: from its first detection on, every frame is detected
    # until it has stable_hits detections in a row.
    def script(i: int):
        rows = [face(walking(i))]
        if i >= 40:
            rows.append(face((200.0, 120.0, 260.0, 200.0)))
        return rows

    proc, det = processor(script, max_interval=5, stable_hits=4)
    steps = run(proc, 80)
    first = min(i for i in det.asked if i >= 40)
    assert first <= 44  # found within max_interval frames
    assert det.asked[det.asked.index(first):][:4] == [first, first + 1, first + 2, first + 3]
    started = [(e.track, e.frame) for s in steps for e in s.events if isinstance(e, TrackStarted)]
    assert started == [(1, 2), (2, first + 2)]
    assert max(np.diff([i for i in det.asked if i > first + 5])) == 5  # sparse again once both are stable


def test_an_empty_scene_is_looked_at_every_max_interval_frames():
    proc, det = processor(lambda i: [face(walking(i))] if i >= 23 else [], max_interval=6, stable_hits=3)
    run(proc, 40)
    assert det.asked[:5] == [0, 6, 12, 18, 24]
    # The newcomer is tentative: every frame until confirmed (and stable) at 26, then sparse again.
    assert det.asked[5:8] == [25, 26, 32]


def test_low_score_track_is_detected_every_frame():
    proc, det = processor(lambda i: [face(walking(i), 0.95 if i < 20 else 0.45)], max_interval=5)
    run(proc, 60)
    assert [i for i in det.asked if i >= 21] == list(range(21, 60))


def test_recently_lost_track_is_searched_every_frame_then_ends_after_max_missed_frames():
    proc, det = processor(lambda i: [face(walking(i))] if i < 50 else [], max_interval=5, stable_hits=3)
    steps = run(proc, 120)
    lost_at = min(i for i in det.asked if i >= 50)
    assert det.asked[det.asked.index(lost_at):][:4] == [lost_at, lost_at + 1, lost_at + 2, lost_at + 3]
    assert max(np.diff([i for i in det.asked if i > lost_at + 5])) == 5  # gone for good: sparse again
    ended = [e for s in steps for e in s.events if isinstance(e, TrackEnded)]
    assert len(ended) == 1 and ended[0].reason == "left" and ended[0].frame <= 49
    # max_missed counts frames: ended about 30 frames after it was last seen, not 30 detections later
    noticed = next(i for i, s in enumerate(steps) if s.ended)
    assert lost_at + 29 <= noticed <= lost_at + 30 + 5


def test_inference_happens_on_the_same_frames_as_with_detection_on_every_frame():
    # The gate's refreshes (birth, warm-up 0.3 s, every 2 s) are detected on rather than predicted, so faces
    # go to inference, and names come, as early as with detection on every frame.
    def chip_frames(**detector) -> list[int]:
        proc, _ = processor(lambda i: [face(walking(i, speed=1.0))], **detector)
        return [s.chips.frame for s in run(proc, 200) if s.chips is not None]

    every = chip_frames(max_interval=1)
    assert len(every) >= 4
    assert chip_frames(max_interval=5) == every
    assert chip_frames(max_interval=30) == every


def test_track_updates_and_frames_seen_count_predicted_frames():
    proc, det = processor(lambda i: [face(walking(i, speed=1.0))], max_interval=5)
    steps = run(proc, 95)
    updates = [e.frame for s in steps for e in s.events if isinstance(e, TrackUpdated)]
    assert updates == [32, 62, 92]  # one a second of stream time after birth at frame 2, as on every frame
    ended = proc.end_all("end_of_input").events
    assert len(det.asked) < 40
    assert ended[0].frames == 95  # every frame it was present on, detected or predicted


def test_end_all_makes_the_next_frame_a_detection():
    proc, det = processor(lambda i: [face(walking(i % 50))], max_interval=8)
    run(proc, 30)
    proc.end_all("source_lost")
    asked = len(det.asked)
    run(proc, 1, start=30)
    assert det.asked[asked:] == [30]


# -- the tracker's side ----------------------------------------------------------------------------------
def faces_at(*boxes: Box, score: float = 0.9) -> Faces:
    return Faces(boxes=list(boxes), scores=[score] * len(boxes),
                 landmarks=np.zeros((len(boxes), 5, 2), np.float32) + np.asarray(boxes[0][:2], np.float32))


def test_tracker_predict_neither_hits_nor_misses_a_live_track():
    tracker = ByteTracker(min_hits=2, max_missed=3)
    assert tracker.all_stable(2)  # nothing to be unsure about
    tracker.update(faces_at(walking(0)), 0, 0.0)
    assert not tracker.all_stable(2)  # tentative
    tracker.update(faces_at(walking(1)), 1, 0.1)
    assert tracker.all_stable(2) and not tracker.all_stable(3)
    for i in range(2, 12):  # the motion model learns the speed
        tracker.update(faces_at(walking(i)), i, i / 10)
    tracker.predict()
    assert tracker.all_stable(2)
    for _ in range(9):  # more than max_missed
        predicted = tracker.predict()
    # Still live; but it has moved 20 px (a fifth of its height) since it was last looked for: look again.
    assert predicted.track_ids.tolist() == [1] and not tracker.all_stable(2)
    assert np.abs(predicted.boxes[0] - np.asarray(walking(21))).max() < 2.0
    assert np.allclose(predicted.landmarks[0], predicted.boxes[0][:2], atol=1e-3)  # moved with the box
    update = tracker.update(faces_at(walking(22)), 22, 2.2)
    assert update.faces.track_ids.tolist() == [1] and not update.ended
    [info] = tracker.flush()
    assert info.frames_seen == 23  # 13 detections and the 10 predicted frames between them


def test_tracker_low_score_match_is_not_stable():
    tracker = ByteTracker(min_hits=1)
    tracker.update(faces_at(walking(0)), 0, 0.0)
    tracker.update(faces_at(walking(1), score=0.4), 1, 0.1)  # continued by the second (low-score) stage
    assert tracker.active_ids.tolist() == [1] and not tracker.all_stable(1)


# -- settings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("detector", "names"),
    [
        ({"max_interval": 0}, "max_interval"),
        ({"max_interval": 31}, "max_interval"),
        ({"interval": 4, "max_interval": 2}, "max_interval"),
        ({"stable_hits": 0}, "stable_hits"),
    ],
)
def test_bad_adaptive_settings_fail_naming_the_setting(detector, names):
    with pytest.raises(ConfigError, match=names):
        load_settings(overrides={"detector": detector})


def test_processor_checks_its_intervals():
    with pytest.raises(ValueError, match="max_interval"):
        StreamProcessor("cam", FrameScript(lambda i: []), prepare, tracker=ByteTracker(), gate=InferenceGate(),
                        interval=3, max_interval=2)
