"""Annotated video output on a real clip: YuNet faces drawn and blurred, H.264 written and read back with PyAV."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.publish.annotate import FaceLabel, blur_faces, draw_faces
from streamer.publish.video import VideoWriter

CLIP = "face_recognition/examples/short_hamilton_clip.mp4"  # 640x360, 29.97 fps, faces from frame 0
FRAMES = 30


@pytest.fixture(scope="module")
def clip_with_faces(media_dir, model_dir):
    """The clip's first 30 frames with YuNet boxes (x1, y1, x2, y2) per frame."""
    detector = cv2.FaceDetectorYN.create(str(model_dir / "face_detection_yunet_2026may.onnx"), "", (640, 360),
                                         0.8, 0.3, 5000)
    frames, boxes = [], []
    with av.open(str(media_dir / CLIP)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == FRAMES:
                break
            image = frame.to_ndarray(format="bgr24")
            _, faces = detector.detect(image)
            xywh = np.zeros((0, 4), np.float32) if faces is None else faces[:, :4]
            frames.append(image)
            boxes.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))
    assert len(frames) == FRAMES and all(len(b) for b in boxes)
    return frames, boxes


def detail(region: np.ndarray) -> float:
    """Variance of the Laplacian: how much fine detail (edges, texture) a region holds."""
    return float(cv2.Laplacian(cv2.cvtColor(region, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


def inner(box: np.ndarray, shrink: float = 0.2) -> tuple[slice, slice]:
    """The middle of a box, away from the drawn outline."""
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) * shrink, (y2 - y1) * shrink
    return slice(max(0, int(y1 + dy)), int(y2 - dy)), slice(max(0, int(x1 + dx)), int(x2 - dx))


def labels_for(boxes: np.ndarray) -> list[FaceLabel]:
    # The largest face is "known", the rest unknown (and blurred under --blur-unknown).
    largest = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    return [
        FaceLabel(track=i + 1, name="lin" if i == largest else None, age=34.4 if i == largest else None,
                  gender="man", emotion="happy" if i == largest else None, known=i == largest)
        for i in range(len(boxes))
    ]


def test_annotated_clip_is_written_as_h264_and_reads_back(clip_with_faces, tmp_path):
    frames, boxes = clip_with_faces
    path = tmp_path / "annotated.mp4"
    annotated = []
    with VideoWriter(path, fps=29.97, width=640, height=360) as writer:
        for image, frame_boxes in zip(frames, boxes):
            labels = labels_for(frame_boxes)
            original = image.copy()
            out = draw_faces(image, frame_boxes, labels, blur_mask=[not label.known for label in labels])
            assert np.array_equal(image, original), "draw_faces must not draw on its input"
            writer.write(out)
            annotated.append(out)
    assert writer.closed and writer.frames == FRAMES

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.format.name == "yuv420p"
        assert abs(float(stream.average_rate) - 29.97) < 0.01
        decoded = [f for f in container.decode(video=0)]
    assert len(decoded) == FRAMES
    assert {(f.width, f.height) for f in decoded} == {(640, 360)}
    assert [f.pts * f.time_base * stream.average_rate for f in decoded] == list(range(FRAMES))
    read_back = [f.to_ndarray(format="bgr24") for f in decoded]
    # Lossy, but the same pictures: small mean error against what was written.
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(annotated, read_back)]) < 6

    # Frame 0 has two faces: the small unknown one is blurred, the known one keeps its detail.
    frame_boxes, labels = boxes[0], labels_for(boxes[0])
    for box, label in zip(frame_boxes, labels):
        region = inner(box)
        before, after = detail(frames[0][region]), detail(read_back[0][region])
        if label.known:
            assert after > 0.3 * before
        else:
            assert after < 0.1 * before, (before, after)
            assert read_back[0][region].var() < frames[0][region].var()
    # Boxes and labels are drawn in the label colours around the known face.
    x1, y1, x2, y2 = frame_boxes[[label.known for label in labels].index(True)].astype(int)
    outline = annotated[0][y1, x1 + 3: x2 - 3]
    assert (np.abs(outline.astype(int) - (60, 200, 60)).sum(axis=1) < 60).mean() > 0.8


@pytest.mark.parametrize("method", ["gaussian", "pixelate"])
def test_blur_faces_removes_detail_inside_boxes_only(clip_with_faces, method):
    frames, boxes = clip_with_faces
    image, box = frames[20], boxes[20][:1]  # a large face (~185x270)
    blurred = blur_faces(image, box, method=method)
    region = inner(box[0], 0.0)
    colours_before = len(np.unique(image[region].reshape(-1, 3), axis=0))
    colours_after = len(np.unique(blurred[region].reshape(-1, 3), axis=0))
    if method == "gaussian":
        assert detail(blurred[region]) < 0.05 * detail(image[region])
        assert blurred[region].var() < 0.5 * image[region].var()
    else:  # blocks of one colour: at most 13 x 13 of them (12 across the margin-grown box, plus a partial one)
        assert colours_after <= 13 * 13 < colours_before / 10, (colours_before, colours_after)
        assert blurred[region].var() < 0.9 * image[region].var()
    # Outside the box plus its margin nothing changed; the input is untouched.
    x1, y1, x2, y2 = box[0]
    mask = np.ones(image.shape[:2], bool)
    mask[max(0, int(y1 - 0.2 * (y2 - y1))): int(y2 + 0.2 * (y2 - y1)) + 1,
         max(0, int(x1 - 0.2 * (x2 - x1))): int(x2 + 0.2 * (x2 - x1)) + 1] = False
    assert np.array_equal(blurred[mask], image[mask])
    assert not np.array_equal(blurred, image)


def test_odd_sizes_are_cropped_to_even_and_index_sets_pts(tmp_path):
    path = tmp_path / "odd.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(path, fps=25, width=101, height=75) as writer:
        for index in (0, 2, 4, 6):  # a stream sampled every other frame keeps its timing
            writer.write(rng.integers(0, 255, (75, 101, 3), dtype=np.uint8), index=index)
        with pytest.raises(ValueError, match="increasing"):
            writer.write(np.zeros((75, 101, 3), np.uint8), index=6)
        with pytest.raises(ValueError, match=r"\(75, 101, 3\)"):
            writer.write(np.zeros((74, 100, 3), np.uint8))
    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    assert [(f.width, f.height) for f in decoded] == [(100, 74)] * 4
    assert [round(float(f.time) * 25) for f in decoded] == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda tmp: tmp / "missing" / "out.mp4", "No such file"),
        (lambda tmp: tmp, "Is a directory"),
    ],
)
def test_unwritable_path_is_one_config_error(tmp_path, make_path, message):
    with pytest.raises(ConfigError, match=rf"output\.path: cannot write video .*{message}"):
        VideoWriter(make_path(tmp_path), fps=30, width=64, height=48)


def test_draw_faces_validates_its_inputs(clip_with_faces):
    image = clip_with_faces[0][0]
    with pytest.raises(ValueError, match="labels: expected one per box"):
        draw_faces(image, np.zeros((2, 4)), [FaceLabel(1, None, None, None, None, False)])
    with pytest.raises(ValueError, match="boxes: expected shape"):
        draw_faces(image, np.zeros((1, 3)), [FaceLabel(1, None, None, None, None, False)])
    with pytest.raises(ValueError, match="expected a uint8 BGR image"):
        draw_faces(image.astype(np.float32), np.zeros((0, 4)), [])
    assert np.array_equal(draw_faces(image, np.zeros((0, 4)), []), image)
    assert FaceLabel(3, "ann", 40.6, "woman", "sad", True).lines() == ["#3 ann", "41y woman sad"]
    assert FaceLabel(4, None, None, None, None, False).lines() == ["#4 unknown"]
