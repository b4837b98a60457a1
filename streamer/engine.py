"""Image-level face analysis (the DeepFace-style calls): detect, represent, verify, find, analyze, enroll.

The stream pipeline uses the same parts (detector, embedder, attribute heads, gallery matcher); this
module only wires them for single images. Models load lazily, once per engine.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from streamer.config import Settings, load_settings
from streamer.errors import GalleryError, InputError, NoFaceError
from streamer.types import Attributes, Faces, rounded_box

log = logging.getLogger(__name__)

ImageInput = str | Path | np.ndarray
# Which face of a photo to enrol: None = the only one (a photo with several is refused), "largest", or N
# (1-based, counted by box centre left to right; see streamer.infer.quality.left_to_right).
FaceChoice = str | int | None


def load_image(image: ImageInput, max_pixels: int | None = None) -> np.ndarray:
    """A BGR uint8 image from a path or an array (grey and BGRA arrays are converted); a file declaring more
    than `max_pixels` (default: limits.max_image_pixels's default) is refused before it is decoded."""
    if isinstance(image, np.ndarray):
        from streamer.imaging import as_bgr

        try:
            return as_bgr(image)
        except ValueError as exc:
            # A bad array is the caller's input, reported like a bad file (CLI: one line, exit 2).
            raise InputError(str(exc)) from None
    from streamer.config import LimitsSettings
    from streamer.imaging import read_image

    return read_image(image, LimitsSettings().max_image_pixels if max_pixels is None else max_pixels)


def _name_of(image: ImageInput) -> str:
    return str(image) if not isinstance(image, np.ndarray) else "<array>"


def content_hash(image: ImageInput) -> str:
    """sha256 (hex) of a photo's bytes (of an array's shape and pixels): the gallery's key for "this photo
    is already enrolled", whatever the file is called or wherever it lies."""
    digest = hashlib.sha256()
    if isinstance(image, np.ndarray):
        digest.update(repr((image.shape, str(image.dtype))).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    else:
        try:
            with open(image, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise InputError(f"{image}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


# Suffixes that promise a photo: such a file that cannot be enrolled is a failure, while any other file
# that is not an image by its content (notes.txt, .DS_Store, Thumbs.db) is a stray, skipped with a warning.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".pbm", ".pgm", ".ppm",
     ".pnm", ".pxm", ".heic", ".heif", ".avif", ".jp2"}
)


@dataclass(frozen=True)
class FolderImport:
    """What `folder_entries` found: what to enrol, and what it left out.

    entries: (name, vectors (N, D), sources, sha256 hashes) per person with at least one usable photo;
    skipped: (path, reason) for stray non-image files and empty folders (warnings, not failures);
    failed: (path, reason) for photos that could not be enrolled (unreadable, no face).
    """

    entries: list[tuple[str, np.ndarray, list[str], list[str]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


# Field names follow the published events (streamer.publish.events.Identity): `name` is the matched person,
# `score` the match confidence; the detector's confidence is always `detection_score`.


@dataclass(frozen=True)
class VerifyResult:
    verified: bool
    distance: float
    threshold: float
    model: str  # the embedder as the user names it (embedder.name: dlib_resnet, mobilefacenet, arcface)
    model_id: str  # the exact embedding space (e.g. dlib_resnet_v1, arcface:<sha256 prefix>)
    detector: str
    metric: str
    face_a: tuple[float, float, float, float]
    face_b: tuple[float, float, float, float]

    def fields(self) -> dict:
        """The JSON of `streamer verify --json` and POST /api/v1/verify (one shape for both)."""
        return {
            "verified": self.verified,
            "distance": self.distance,
            "threshold": self.threshold,
            "model": self.model,
            "model_id": self.model_id,
            "detector": self.detector,
            "metric": self.metric,
            "facial_areas": {"img_a": list(self.face_a), "img_b": list(self.face_b)},
        }


@dataclass(frozen=True)
class AnalyzedFace:
    box: tuple[float, float, float, float]
    detection_score: float
    attributes: Attributes


@dataclass(frozen=True)
class FoundFace:
    box: tuple[float, float, float, float]
    detection_score: float
    name: str | None  # gallery name, None for an unknown face
    score: float  # match confidence in [0, 1], 0.5 at the threshold
    distance: float | None  # to the best gallery match; None when the gallery is empty


def _box(row: np.ndarray) -> tuple[float, float, float, float]:
    return tuple(rounded_box(row))  # type: ignore[return-value]


class FaceEngine:
    """Detector + embedder + attribute heads + gallery matching for whole images."""

    def __init__(self, settings: Settings | None = None) -> None:
        from streamer.models.factory import ModelFactory

        self.settings = settings or load_settings()
        self.models = ModelFactory(self.settings)
        self.registry = self.models.registry
        self.runtime = self.models.runtime
        self._heads: dict[str, object] = {}

    # -- parts, loaded on first use ------------------------------------------------------------
    @cached_property
    def detector(self):
        return self.models.detector()

    @cached_property
    def embedder(self):
        return self.models.embedder()

    @property
    def embedder_name(self) -> str:
        """The embedder as the user chose it (`embedder.name`); `embedder.id` is the exact model."""
        return self.settings.embedder.name

    def head(self, name: str):
        if name not in self._heads:
            self._heads[name] = self.models.head(name)
        return self._heads[name]

    def close(self) -> None:
        if "detector" in self.__dict__:
            self.detector.close()

    def __enter__(self) -> FaceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- detection ------------------------------------------------------------------------------
    def detect(self, image: ImageInput) -> Faces:
        return self.detector.detect(load_image(image, self.settings.limits.max_image_pixels))

    def primary_face(self, image: np.ndarray, faces: Faces) -> Faces:
        """The one face a single-person call uses.

        BlazeFace gives confident false positives larger than the real face, so it picks by score;
        box detectors (YuNet, SCRFD) pick the largest face, the subject of a portrait.
        """
        if len(faces) == 0:
            raise NoFaceError("no face found")
        if self.detector.name == "blazeface":
            return faces[int(np.argmax(faces.scores))]
        return faces[int(np.argmax(faces.areas))]

    # -- embeddings -----------------------------------------------------------------------------
    def represent(self, image: ImageInput) -> tuple[Faces, np.ndarray]:
        """Every face and its embedding (rows in the same order)."""
        bgr = load_image(image, self.settings.limits.max_image_pixels)
        faces = self.detector.detect(bgr)
        return faces, self.embed_faces(bgr, faces)

    def embed_faces(self, image: np.ndarray, faces: Faces) -> np.ndarray:
        redetect = self.detector.detect if self.settings.embedder.redetect != "off" else None
        chips = self.embedder.spec.prepare(image, faces, redetect)
        return self.embedder.embed(chips)

    def embed_primary(self, image: ImageInput) -> tuple[Faces, np.ndarray]:
        bgr = load_image(image, self.settings.limits.max_image_pixels)
        try:
            face = self.primary_face(bgr, self.detector.detect(bgr))
        except NoFaceError:
            raise NoFaceError(f"{_name_of(image)}: no face found") from None
        return face, self.embed_faces(bgr, face)[0]

    def verify(self, image_a: ImageInput, image_b: ImageInput) -> VerifyResult:
        return self.compare(self.embed_primary(image_a), self.embed_primary(image_b))

    def compare(self, primary_a: tuple[Faces, np.ndarray], primary_b: tuple[Faces, np.ndarray]) -> VerifyResult:
        """`verify` on two `embed_primary` results, so a caller comparing many pairs embeds each image once."""
        (face_a, emb_a), (face_b, emb_b) = primary_a, primary_b
        spec = self.embedder.spec
        distance = float(self.embedder.distances(emb_a[None], emb_b[None])[0, 0])
        return VerifyResult(
            verified=distance < spec.threshold,
            distance=round(distance, 6),
            threshold=spec.threshold,
            model=self.embedder_name,
            model_id=spec.id,
            detector=self.detector.name,
            metric=spec.metric,
            face_a=_box(face_a.boxes[0]),
            face_b=_box(face_b.boxes[0]),
        )

    # -- attributes -----------------------------------------------------------------------------
    def attributes_of(self, image: np.ndarray, faces: Faces) -> list[Attributes]:
        from streamer.infer.attributes import combine_attributes

        outputs = {}
        for name in self.settings.attributes.enabled:
            head = self.head(name)
            outputs[name] = head.predict(head.prepare(image, faces))
        limits = self.settings.attributes
        return combine_attributes(len(faces), **outputs, min_gender_confidence=limits.min_gender_confidence,
                                  min_emotion_confidence=limits.min_emotion_confidence)

    def analyze(self, image: ImageInput) -> list[AnalyzedFace]:
        bgr = load_image(image, self.settings.limits.max_image_pixels)
        faces = self.detector.detect(bgr)
        attributes = self.attributes_of(bgr, faces)
        return [
            AnalyzedFace(
                box=_box(faces.boxes[i]), detection_score=round(float(faces.scores[i]), 4), attributes=attributes[i]
            )
            for i in range(len(faces))
        ]

    # -- gallery --------------------------------------------------------------------------------
    def open_gallery(self, path: str | Path | None = None, *, create: bool = False, readonly: bool = False):
        """The gallery at `path` (an SQLite file, or a postgresql:// URL), else the one the settings name."""
        from streamer.match.open import location, open_gallery

        where = path or location(self.settings.gallery)
        if where is None:
            raise GalleryError("no gallery given: pass --gallery PATH or URL, or set gallery.path "
                               "(STREAMER_GALLERY__PATH) or gallery.url (STREAMER_GALLERY__URL)")
        return open_gallery(where, create=create, readonly=readonly)

    def matcher(self, gallery):
        """A matcher for this engine's embedder; a gallery enrolled only with other embedders is refused."""
        from streamer.match.matcher import Matcher, check_embedder

        spec = self.embedder.spec
        check_embedder(gallery, spec.id)
        return Matcher(gallery, spec.id, spec.metric, self.embedder.spec.threshold)

    def find(self, image: ImageInput, gallery) -> list[FoundFace]:
        """Who is in `image`: `gallery` is an open `Gallery` or the path of an existing gallery file."""
        if isinstance(gallery, (str, Path)):
            with self.open_gallery(gallery, readonly=True) as opened:
                return self.find(image, opened)
        bgr = load_image(image, self.settings.limits.max_image_pixels)
        faces = self.detector.detect(bgr)
        embeddings = self.embed_faces(bgr, faces)
        matches = self.matcher(gallery).match(embeddings)
        return [
            FoundFace(
                box=_box(faces.boxes[i]),
                detection_score=round(float(faces.scores[i]), 4),
                name=m.name,
                score=round(float(m.score), 4),
                distance=None if m.distance is None or not np.isfinite(m.distance) else round(float(m.distance), 6),
            )
            for i, m in enumerate(matches)
        ]

    def enrolment_face(self, image: ImageInput, face: FaceChoice = None) -> tuple[Faces, np.ndarray]:
        """The face of `image` to enrol and its embedding, or InputError (NoFaceError) saying why not: a
        photo with several faces unless `face` picks one, a face too small, blurred or turned away
        (settings enrolment.*). A poor enrolled face would degrade every later match of that person."""
        from streamer.infer.quality import face_quality, left_to_right

        bgr = load_image(image, self.settings.limits.max_image_pixels)
        faces = self.detector.detect(bgr)
        name = _name_of(image)
        if len(faces) == 0:
            raise NoFaceError(f"{name}: no face found")
        if face is None:
            if len(faces) > 1:
                raise InputError(
                    f"{name}: {len(faces)} faces found; pick one with --face largest or --face N "
                    f"(1-{len(faces)}, left to right)"
                )
            chosen = faces[0]
        elif face == "largest":
            chosen = faces[int(np.argmax(faces.areas))]
        elif isinstance(face, int) and not isinstance(face, bool) and face >= 1:
            if face > len(faces):
                raise InputError(f"{name}: --face {face} asked for, but only {len(faces)} face(s) found")
            chosen = faces[int(left_to_right(faces)[face - 1])]
        else:
            raise InputError(f"face must be 'largest' or a face number from 1 (left to right), got {face!r}")
        quality = face_quality(bgr, chosen.boxes[0], chosen.landmarks[0], self.settings.enrolment)
        if quality.reasons:
            raise InputError(f"{name}: refused: {'; '.join(quality.reasons)}; use a clearer, frontal photo")
        return chosen, self.embed_faces(bgr, chosen)[0]

    def enrollment_embeddings(
        self, images: Sequence[ImageInput], face: FaceChoice = None, *, checked: bool = False
    ) -> tuple[np.ndarray, list[str]]:
        """One embedding per image: with `checked`, the face `enrolment_face` accepts; otherwise the
        primary face (negative examples: any view of a look-alike helps). Any bad image fails the
        whole call, so a caller writes nothing unless every image worked."""
        if not images:
            raise InputError("no images given")
        vectors, sources = [], []
        for image in images:
            _, vector = self.enrolment_face(image, face) if checked else self.embed_primary(image)
            vectors.append(vector)
            sources.append(Path(image).name if not isinstance(image, np.ndarray) else "<array>")
        return np.stack(vectors).astype(np.float32), sources

    def enroll(self, gallery, name: str, images: Sequence[ImageInput], face: FaceChoice = None) -> int:
        """Enrol `images` for `name`; returns the faces added (photos already enrolled for them add none).

        Each photo must show one good face (see `enrolment_face`); `face` ("largest" or N, 1-based left
        to right) picks one in photos with several. One refused photo fails the call, enrolling nothing."""
        vectors, sources = self.enrollment_embeddings(images, face, checked=True)
        hashes = [content_hash(image) for image in images]
        done = gallery.enrol([(name, vectors, sources, hashes)], self.embedder.spec.id)
        return done[0].added

    def reject(self, gallery, name: str, images: Sequence[ImageInput]) -> int:
        """Record `images` as faces that are NOT `name` (negative examples); returns how many were added."""
        vectors, sources = self.enrollment_embeddings(images)
        hashes = [content_hash(image) for image in images]
        return gallery.reject(name, vectors, self.embedder.spec.id, sources, hashes).added

    def folder_entries(self, folder: str | Path, face: FaceChoice = None) -> FolderImport:
        """Embeddings for a folder holding one sub-folder per person (the sub-folder names the person).

        Every photo that works is kept; stray non-image files and empty folders are skipped, and photos
        that cannot be enrolled (unreadable, no face, several faces unless `face` picks one, refused by
        quality: see `enrolment_face`) are failed, each with its reason (see FolderImport). Nothing is
        written here; the caller enrols the entries in one transaction."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: not a directory")
        people = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not people:
            raise InputError(f"{folder}: no sub-folders (expected one folder per person holding their photos)")
        result = FolderImport()
        for stray in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            result.skipped.append((str(stray), "a file beside the person folders (expected one folder per person)"))
        for person in people:
            files = sorted(p for p in person.iterdir() if p.is_file() and not p.name.startswith("."))
            vectors, sources, hashes = [], [], []
            for file in files:
                # By content, as `gallery add` decides (cv2 reads the signature): a GIF or a .JPG from a
                # phone is a photo whatever its suffix says.
                if not cv2.haveImageReader(str(file)):
                    if file.suffix.lower() in IMAGE_SUFFIXES:
                        result.failed.append((str(file), "not an image file (JPEG, PNG, WebP, BMP, TIFF, GIF, PNM)"))
                    else:
                        result.skipped.append((str(file), "not an image"))
                    continue
                try:
                    _, vector = self.enrolment_face(file, face)
                    digest = content_hash(file)
                except (InputError, NoFaceError) as exc:
                    result.failed.append((str(file), str(exc).removeprefix(f"{file}: ")))
                    continue
                vectors.append(vector)
                sources.append(file.name)
                hashes.append(digest)
            if vectors:
                result.entries.append((person.name, np.stack(vectors).astype(np.float32), sources, hashes))
            elif not files:
                result.skipped.append((str(person), f"empty folder (no photos of {person.name})"))
        return result

    def import_folder(self, gallery, folder: str | Path, face: FaceChoice = None) -> FolderImport:
        """`folder_entries`, then enrol what worked in one transaction (photos already enrolled add nothing)."""
        found = self.folder_entries(folder, face)
        gallery.enrol(found.entries, self.embedder.spec.id)
        return found
