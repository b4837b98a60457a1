"""Where streamer's dlib-ResNet chips differ from face_recognition's, measured on the shared pairs.

    python tools/chip_compare.py /work/shared/media/pairs.csv [--root DIR] [--variants a,b,...]

For every photo of PAIRS.csv it cuts the primary face (the one `streamer verify` uses) several ways,
embeds every chip with streamer's dlib ResNet (ONNX), and prints one JSON line per variant: pair
accuracy at the shipped threshold, wrong accepts/rejects, ROC AUC (tools/score_pairs.py's `score`), and
how far that variant's descriptors are from those of dlib's own chip of the same face (Euclidean, mean
and max). dlib (dlib-bin, a test extra) is only the reference here, never a runtime dependency.

Variants:
    streamer      what `streamer verify` does (YuNet five points, DLIB_150 template, align.py's cut)
    dlib          face_recognition's pipeline: HOG (largest face, photo shrunk to 1024 px), 5-point
                  shape predictor, dlib.get_face_chip(150, padding 0.25)
    dlib_ourcut   dlib's chip geometry, cut with align.py's warp (isolates cutting from geometry)
    dlib_ourbox   dlib's shape predictor run inside YuNet's box, dlib's chip (isolates the detector box)
    yunet_ls      YuNet five points, plain least-squares similarity instead of LMEDS
    yunet_eyesnose YuNet eyes + nose tip only (mouth corners move with expression), least squares
    redetect      align.redetect_landmarks: YuNet again on a view of the face cut with the first
                  alignment (the chip's field doubled, --zoom view pixels per chip pixel), then as streamer
    redetect2     the same, looking again twice
    mesh5         MediaPipe face landmarker (478 points, run on a crop around YuNet's box), eye corners +
                  nose base (dlib's own five definitions) onto a template fitted on these photos (median of
                  the points mapped into dlib's chip; geometry only, no labels). 25 ms a face on 2 cores
Nothing of a face is written to disk: chips and descriptors stay in memory (--dump-pairs writes pair
distances only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from score_pairs import read_labels, score

from streamer.engine import FaceEngine, load_image
from streamer.infer import align

SIZE, PADDING = 150, 0.25
# MediaPipe face mesh indices for dlib's 5-point definitions, in dlib's order: subject's left eye outer
# and inner corner (image right), right eye outer and inner corner, nose base (subnasale).
MESH_DLIB5 = (263, 362, 33, 133, 2)


def _warp(bgr: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    out = np.zeros((SIZE, SIZE, 3), np.uint8)
    align._warp_one(bgr, matrix, SIZE, out)
    return out


def _least_squares(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    return align._umeyama(np.asarray(src, np.float64), np.asarray(dst, np.float64))


def dlib_image_to_chip(details) -> np.ndarray:
    rect = details.rect
    center = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
    c, s = np.cos(details.angle), np.sin(details.angle)
    corners = [(rect.left(), rect.top()), (rect.right(), rect.top()), (rect.right(), rect.bottom())]
    src = np.array([center + np.array([c * (x - center[0]) - s * (y - center[1]),
                                       s * (x - center[0]) + c * (y - center[1])]) for x, y in corners], np.float32)
    dst = np.array([(0, 0), (details.cols - 1, 0), (details.cols - 1, details.rows - 1)], np.float32)
    return cv2.getAffineTransform(src, dst)


class Mesh:
    """MediaPipe face landmarker on a square crop around a detector box (IMAGE mode)."""

    def __init__(self, model: Path) -> None:
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(model)), num_faces=1,
            min_face_detection_confidence=0.3, min_face_presence_confidence=0.3,
        )
        self.landmarker = vision.FaceLandmarker.create_from_options(options)

    def points(self, bgr: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        import mediapipe as mp

        x0, y0, x1, y1 = box
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 1.0
        # crop (2x the box) to at most 512 px: the landmarker's own detector expects a face filling the view
        scale = min(1.0, 512 / (2 * half))
        m = np.array([[scale, 0, -(cx - half) * scale], [0, scale, -(cy - half) * scale]])
        side = round(2 * half * scale)
        crop = cv2.warpAffine(bgr, m, (side, side), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
        rgb = np.ascontiguousarray(crop[..., ::-1])
        result = self.landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb))
        if not result.face_landmarks:
            return None
        lm = result.face_landmarks[0]
        pts = np.array([[lm[i].x * side, lm[i].y * side] for i in MESH_DLIB5])
        inv = cv2.invertAffineTransform(m)
        return pts @ inv[:, :2].T + inv[:, 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--variants", default="streamer,dlib,dlib_ourcut,dlib_ourbox,yunet_ls,yunet_eyesnose,redetect,mesh5")
    parser.add_argument("--zoom", type=float, default=align.REDETECT_ZOOM, help="redetect: view pixels per chip pixel")
    parser.add_argument("--dump-pairs", type=Path, help="write per-pair distances of every variant (JSON)")
    args = parser.parse_args()
    root = args.root or args.pairs.parent
    variants = args.variants.split(",")
    labels = read_labels(args.pairs)
    photos = sorted({p for pair in labels for p in pair})

    import dlib
    import face_recognition_models

    package = Path(face_recognition_models.__file__).parent / "models"
    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(package / "shape_predictor_5_face_landmarks.dat"))
    engine = FaceEngine()
    embedder = engine.embedder
    mesh = Mesh(Path(os.environ["STREAMER_MODEL_DIR"]) / "face_landmarker.task") if "mesh5" in variants else None

    chips: dict[str, dict[str, np.ndarray]] = {v: {} for v in variants}
    mesh_in_chip, pending_mesh = [], {}
    yunet_t = align.DLIB_150.points_for(engine.detector.scheme)
    for name in photos:
        bgr = load_image(root / name)
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        faces = engine.detector.detect(bgr)
        if len(faces) == 0:
            continue
        face = engine.primary_face(bgr, faces)
        lm, box = face.landmarks[0], face.boxes[0]
        # HOG on at most 1024 px (full-size photos upsampled would take seconds each), 1 upsample if needed
        f = min(1.0, 1024 / max(rgb.shape[:2]))
        small = cv2.resize(rgb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) if f < 1 else rgb
        rects = hog(small, 0) or hog(small, 1)
        shape = None
        if rects:
            r = max(rects, key=lambda r: r.area())
            r = dlib.rectangle(*[round(v / f) for v in (r.left(), r.top(), r.right(), r.bottom())])
            shape = predictor(rgb, r)
        own = predictor(rgb, dlib.rectangle(*[round(float(v)) for v in box]))
        for v in variants:
            if v == "streamer":
                chips[v][name] = engine.embedder.spec.prepare(bgr, face)[0]
            elif v == "dlib" and shape is not None:
                chips[v][name] = np.array(dlib.get_face_chip(rgb, shape, SIZE, PADDING))[..., ::-1]
            elif v == "dlib_ourcut" and shape is not None:
                chips[v][name] = _warp(bgr, dlib_image_to_chip(dlib.get_face_chip_details(shape, SIZE, PADDING)))
            elif v == "dlib_ourbox":
                chips[v][name] = np.array(dlib.get_face_chip(rgb, own, SIZE, PADDING))[..., ::-1]
            elif v == "yunet_ls":
                chips[v][name] = _warp(bgr, _least_squares(lm, yunet_t))
            elif v == "redetect":
                refined = align.redetect_landmarks(bgr, face, align.DLIB_150, engine.detector.detect, args.zoom)
                chips[v][name] = engine.embedder.spec.prepare(bgr, refined)[0]
            elif v == "redetect2":  # the second look taken twice
                refined = align.redetect_landmarks(bgr, face, align.DLIB_150, engine.detector.detect, args.zoom)
                refined = align.redetect_landmarks(bgr, refined, align.DLIB_150, engine.detector.detect, args.zoom)
                chips[v][name] = engine.embedder.spec.prepare(bgr, refined)[0]
            elif v == "yunet_eyesnose":
                chips[v][name] = _warp(bgr, _least_squares(lm[:3], yunet_t[:3]))
            elif v == "mesh5":
                pts = mesh.points(bgr, box)
                if pts is not None:
                    pending_mesh[name] = (bgr, pts)
                    ref = dlib_image_to_chip(dlib.get_face_chip_details(own, SIZE, PADDING))
                    mesh_in_chip.append(pts @ ref[:, :2].T + ref[:, 2])
        # the reference descriptor for "distance from dlib's own chip": the box-independent dlib chip
        if shape is not None:
            chips.setdefault("_ref", {})[name] = np.array(dlib.get_face_chip(rgb, shape, SIZE, PADDING))[..., ::-1]
    if mesh is not None and mesh_in_chip:
        template = np.median(np.stack(mesh_in_chip), axis=0)
        print(json.dumps({"mesh5_template_in_dlib_chip": np.round(template, 2).tolist(),
                          "faces": len(mesh_in_chip)}), flush=True)
        for name, (bgr, pts) in pending_mesh.items():
            chips["mesh5"][name] = _warp(bgr, _least_squares(pts, template))

    if mesh is not None:
        mesh.landmarker.close()

    def descriptors(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = sorted(table)
        vecs = embedder.embed(np.stack([table[n] for n in names])) if names else []
        return dict(zip(names, vecs))

    ref = descriptors(chips.pop("_ref", {}))
    per_pair = {}
    for v in variants:
        desc = descriptors(chips[v])
        rows = []
        for a, b in labels:
            if a in desc and b in desc:
                d = float(np.linalg.norm(desc[a] - desc[b]))
                rows.append({"file_a": a, "file_b": b, "distance": d, "verified": d < embedder.spec.threshold})
            else:
                rows.append({"file_a": a, "file_b": b, "error": "no face"})
        per_pair[v] = {f"{r['file_a']}|{r['file_b']}": r.get("distance") for r in rows}
        off = [float(np.linalg.norm(desc[n] - ref[n])) for n in desc if n in ref]
        print(json.dumps({"variant": v, **score(rows, labels), "faces": len(desc),
                          "to_dlib_chip_mean": round(float(np.mean(off)), 4) if off else None,
                          "to_dlib_chip_max": round(float(np.max(off)), 4) if off else None}), flush=True)
    if args.dump_pairs:
        args.dump_pairs.write_text(json.dumps(per_pair))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
