"""Face-attribute heads: age (SSR-Net), gender and emotion (mini_XCEPTION), one small interface each.

Every head has two halves that live in different processes:
- `prepare(image_bgr, faces)`: the crop and preprocessing, numpy + cv2 only, run where the frame is
  (the detect worker); it turns a `Faces` record into one (N, 64, 64, C) float32 batch.
- `predict(crops)`: one `session.run` for the whole batch (the inference worker) decoded into a typed
  prediction. `combine_attributes` turns the predictions for N faces into N `streamer.types.Attributes`.
  Across processes the predictions travel as plain arrays (`predict_arrays`, `attributes_from_arrays`).

Each model has its own crop (docs/keras-attribute-models.md, sections 4-5): the emotion model sees a
tight square on the face box, the gender model a square with 40 % margin (what its IMDB-WIKI training
crops looked like), SSR-Net the box +-40 % per axis clipped to the image, in raw BGR. Integer rounding
follows the reference crops in models/testdata/keras_reference.npz exactly (for the emotion crop,
before its histogram equalisation: see `prepare_emotion`).

What makes the answers trustworthy rather than merely fast (issue 11):
- every head averages its output over the crop and the crop's mirror image (one `session.run` on a
  batch of 2N): a face and its mirror show the same person, age and expression;
- a gender or emotion whose probability is below a confidence setting is reported as None (abstain)
  rather than guessed: `combine_attributes(..., min_gender_confidence=, min_emotion_confidence=)`
  for single images, `AttributeSmoother` (streamer.match.voting) for tracks, which abstains on the
  smoothed value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from streamer.errors import ConfigError, ModelError
from streamer.imaging import check_image
from streamer.models.registry import ModelRegistry
from streamer.models.runtime import OnnxModel, RuntimeOptions
from streamer.types import Attributes, Emotion, Faces, Gender

HEADS = ("age", "gender", "emotion")
SIZE = 64  # all three models take 64x64 crops
AGE_RANGE = (0.0, 100.0)
GENDER_LABELS = ("woman", "man")  # the gender model's class order
GENDER_MARGIN = 1.8  # square side = 1.8 * max(w, h): 40 % of the face size on each side
AGE_MARGIN = 0.4  # SSR-Net demo `ad`: box grows 40 % of its width/height on each side
# Abstain below these (the defaults of settings attributes.min_gender_confidence / min_emotion_confidence).
# Gender: on the shared identity photos the one wrong answer left with the mirror average (of 116) was
# at 0.62, and 111 of the 115 right ones were at 0.7 or more (tools/gender_eval.py). Emotion: seven classes, so a
# label under 0.5 is more likely wrong than right (the dark Hamilton audience reads 0.3-0.5 "angry").
DEFAULT_MIN_GENDER_CONFIDENCE = 0.7
DEFAULT_MIN_EMOTION_CONFIDENCE = 0.5
# A track's emotion waits for this many readings: one frame of a face (a laugh caught mid-way, a blink)
# reads a strong wrong expression often enough; the second reading comes with the name's (recognition's
# warm-up refresh), so it costs a fraction of a second. Setting attributes.min_emotion_readings.
DEFAULT_MIN_EMOTION_READINGS = 2


# ---------------------------------------------------------------------------------------------
# crops (light: no onnxruntime, used in the detect worker)


def _window(image: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """image[y1:y2, x1:x2], with pixels outside the image filled by edge replication."""
    height, width = image.shape[:2]
    if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height:
        return image[y1:y2, x1:x2]
    rows = np.clip(np.arange(y1, y2), 0, height - 1)
    cols = np.clip(np.arange(x1, x2), 0, width - 1)
    return image[np.ix_(rows, cols)]


def _square_windows(boxes: np.ndarray, factor: float) -> np.ndarray:
    """(N, 4) int x1, y1, x2, y2 of squares centred on the boxes, side factor * max(w, h)."""
    boxes = boxes.astype(np.float64)
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = boxes[:, :2] + wh / 2
    side = factor * wh.max(axis=1)
    corner = np.rint(centre - side[:, None] / 2).astype(np.int64)
    side_px = np.maximum(np.rint(side).astype(np.int64), 1)
    return np.concatenate([corner, corner + side_px[:, None]], axis=1)


def square_gray_crops(image_bgr: np.ndarray, faces: Faces, factor: float, *, equalize: bool = False) -> np.ndarray:
    """(N, 64, 64, 1) mini_XCEPTION input: square of side factor * max(w, h) on each box, gray,
    bilinear to 64x64, optionally histogram-equalised, x/255*2-1."""
    check_image(image_bgr)
    batch = np.empty((len(faces), SIZE, SIZE, 1), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(_square_windows(faces.boxes, factor)):
        gray = cv2.cvtColor(_window(image_bgr, x1, y1, x2, y2), cv2.COLOR_BGR2GRAY)
        small = cv2.resize(gray, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        if equalize and int(small.max()) > int(small.min()):  # a flat crop has no contrast to spread
            small = cv2.equalizeHist(small)
        batch[i, :, :, 0] = small
    # [-1, 1] as in training (preprocess_input v2=True), not the [0, 1] of the repo's video demo
    return batch / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def prepare_emotion(image_bgr: np.ndarray, faces: Faces) -> np.ndarray:
    """(N, 64, 64, 1): tight square on each box (side max(w, h)), gray, bilinear, histogram-equalised,
    x/255*2-1.

    The equalisation is not in the reference recipe: FER2013's training faces are web photos with
    normal exposure, and a dim, low-contrast face (an audience in a dark room) reads "angry" to the
    model whatever its expression. Spreading the crop's gray levels first took the laughing Hamilton
    audience from 87 of 140 faces "angry" (10 "happy") to 19 "angry" (45 "happy"), mirror-averaged,
    while the well-lit deepface portraits kept their labels (36 -> 37 happy, 3 -> 0 angry).
    """
    return square_gray_crops(image_bgr, faces, 1.0, equalize=True)


def prepare_gender(image_bgr: np.ndarray, faces: Faces) -> np.ndarray:
    """(N, 64, 64, 1): square of side 1.8 * max(w, h) centred on each box, gray, bilinear, x/255*2-1.

    Kept after measuring alternatives on the identity photos (tools/gender_eval.py, mirror-averaged):
    this crop 115/116 right, the SSR-Net crop in gray 112, a 1.4 square 114, the tight square 79.
    """
    return square_gray_crops(image_bgr, faces, GENDER_MARGIN)


def prepare_age(image_bgr: np.ndarray, faces: Faces) -> np.ndarray:
    """(N, 64, 64, 3): SSR-Net crop, box +-40 % per axis clipped to the image (not squared), raw BGR 0..255."""
    check_image(image_bgr)
    height, width = image_bgr.shape[:2]
    boxes = faces.boxes.astype(np.float64)
    # the demo works on integer x, y, w, h and truncates the margins with int()
    x, y = np.rint(boxes[:, 0]), np.rint(boxes[:, 1])
    w, h = np.rint(boxes[:, 2] - boxes[:, 0]), np.rint(boxes[:, 3] - boxes[:, 1])
    xw1 = np.clip(np.trunc(x - AGE_MARGIN * w), 0, width - 1).astype(np.int64)
    yw1 = np.clip(np.trunc(y - AGE_MARGIN * h), 0, height - 1).astype(np.int64)
    # inclusive end (the demo slices to xw2 + 1); at least one pixel even for a box off the image
    xw2 = np.clip(np.trunc(x + w + AGE_MARGIN * w), xw1, width - 1).astype(np.int64)
    yw2 = np.clip(np.trunc(y + h + AGE_MARGIN * h), yw1, height - 1).astype(np.int64)
    batch = np.empty((len(faces), SIZE, SIZE, 3), np.float32)
    for i in range(len(faces)):
        crop = image_bgr[yw1[i] : yw2[i] + 1, xw1[i] : xw2[i] + 1]
        batch[i] = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return batch


PREPARE: dict[str, Callable[[np.ndarray, Faces], np.ndarray]] = {
    "age": prepare_age,
    "gender": prepare_gender,
    "emotion": prepare_emotion,
}


def prepare_function(name: str) -> Callable[[np.ndarray, Faces], np.ndarray]:
    """Head `name`'s crop function, without loading its model (for the detect worker)."""
    return PREPARE[_check_name(name)]


def prepare(name: str, image_bgr: np.ndarray, faces: Faces) -> np.ndarray:
    """The crops head `name` expects, without loading its model."""
    return prepare_function(name)(image_bgr, faces)


# ---------------------------------------------------------------------------------------------
# typed predictions


def _rows(name: str, array: np.ndarray, shape: tuple[int | None, ...]) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != len(shape) or any(w is not None and g != w for g, w in zip(array.shape, shape)):
        pretty = ", ".join("N" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "")
        raise ValueError(f"{name}: expected shape ({pretty}), got {array.shape}")
    return array


@dataclass(frozen=True, eq=False)
class EmotionPrediction:
    """probabilities (N, 7), columns in `Emotion.LABELS` order (angry ... neutral)."""

    probabilities: np.ndarray

    def __post_init__(self) -> None:
        shape = (None, len(Emotion.LABELS))
        probabilities = _rows("EmotionPrediction.probabilities", self.probabilities, shape)
        object.__setattr__(self, "probabilities", probabilities)

    def __len__(self) -> int:
        return len(self.probabilities)

    @property
    def values(self) -> np.ndarray:
        return self.probabilities

    @property
    def labels(self) -> list[str]:
        return [Emotion.LABELS[k] for k in self.probabilities.argmax(axis=1)]

    def emotion(self, i: int) -> Emotion:
        row = self.probabilities[i]
        return Emotion(
            label=Emotion.LABELS[int(row.argmax())],
            scores={label: float(p) for label, p in zip(Emotion.LABELS, row)},
        )


@dataclass(frozen=True, eq=False)
class GenderPrediction:
    """p_man (N,): probability that the face is a man's (the model's class 1)."""

    p_man: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "p_man", _rows("GenderPrediction.p_man", self.p_man, (None,)))

    def __len__(self) -> int:
        return len(self.p_man)

    @property
    def values(self) -> np.ndarray:
        return self.p_man

    @property
    def labels(self) -> list[str]:
        return [GENDER_LABELS[int(p > 0.5)] for p in self.p_man]  # a tie goes to class 0 like argmax

    @property
    def probabilities(self) -> np.ndarray:
        """Probability of each face's label."""
        return np.where(self.p_man > 0.5, self.p_man, 1.0 - self.p_man).astype(np.float32)

    def gender(self, i: int) -> Gender:
        p = float(self.p_man[i])
        return Gender(label="man", probability=p) if p > 0.5 else Gender(label="woman", probability=1.0 - p)


@dataclass(frozen=True, eq=False)
class AgePrediction:
    """years (N,), clamped to [0, 100] (SSR-Net's stage outputs are unbounded ReLUs)."""

    years: np.ndarray

    def __post_init__(self) -> None:
        years = np.clip(_rows("AgePrediction.years", self.years, (None,)), *AGE_RANGE)
        object.__setattr__(self, "years", years)

    def __len__(self) -> int:
        return len(self.years)

    @property
    def values(self) -> np.ndarray:
        return self.years


Prediction = AgePrediction | GenderPrediction | EmotionPrediction


def _check_confidence(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def abstain(
    attributes: Attributes,
    min_gender_confidence: float = DEFAULT_MIN_GENDER_CONFIDENCE,
    min_emotion_confidence: float = DEFAULT_MIN_EMOTION_CONFIDENCE,
) -> Attributes:
    """`attributes` with gender / emotion set to None where their probability is below the setting."""
    gender, emotion = attributes.gender, attributes.emotion
    if gender is not None and gender.probability < min_gender_confidence:
        gender = None
    if emotion is not None and emotion.scores.get(emotion.label, 0.0) < min_emotion_confidence:
        emotion = None
    if gender is attributes.gender and emotion is attributes.emotion:
        return attributes
    return Attributes(age=attributes.age, gender=gender, emotion=emotion)


def combine_attributes(
    count: int,
    *,
    age: AgePrediction | None = None,
    gender: GenderPrediction | None = None,
    emotion: EmotionPrediction | None = None,
    min_gender_confidence: float = DEFAULT_MIN_GENDER_CONFIDENCE,
    min_emotion_confidence: float = DEFAULT_MIN_EMOTION_CONFIDENCE,
) -> list[Attributes]:
    """One `Attributes` per face from the heads that ran (a head left out gives None fields; so does a
    gender or emotion less probable than its min_*_confidence: pass 0 to always get the label)."""
    _check_confidence("min_gender_confidence", min_gender_confidence)
    _check_confidence("min_emotion_confidence", min_emotion_confidence)
    for name, prediction in (("age", age), ("gender", gender), ("emotion", emotion)):
        if prediction is not None and len(prediction) != count:
            raise ValueError(f"combine_attributes: {name} has {len(prediction)} rows, expected {count}")
    return [
        abstain(
            Attributes(
                age=float(age.years[i]) if age is not None else None,
                gender=gender.gender(i) if gender is not None else None,
                emotion=emotion.emotion(i) if emotion is not None else None,
            ),
            min_gender_confidence,
            min_emotion_confidence,
        )
        for i in range(count)
    ]


_PREDICTIONS: dict[str, type] = {"age": AgePrediction, "gender": GenderPrediction, "emotion": EmotionPrediction}


def attributes_from_arrays(
    count: int,
    arrays: Mapping[str, np.ndarray],
    min_gender_confidence: float = 0.0,
    min_emotion_confidence: float = 0.0,
) -> list[Attributes]:
    """`combine_attributes` for predictions that crossed a process boundary as `predict_arrays` output
    (keys age, gender, emotion; other keys such as embeddings are ignored). By default it never
    abstains: the pipeline feeds every frame's probabilities to `AttributeSmoother`, which abstains on
    the track's smoothed value (a run of unsure frames still adds up to evidence)."""
    return combine_attributes(
        count,
        **{name: _PREDICTIONS[name](arrays[name]) for name in HEADS if name in arrays},
        min_gender_confidence=min_gender_confidence,
        min_emotion_confidence=min_emotion_confidence,
    )


# ---------------------------------------------------------------------------------------------
# heads (the session part, used in the inference worker)


class AttributeHead(ABC):
    """One attribute model: `prepare` is static (no session needed), `predict` runs the session once."""

    name: ClassVar[str]
    channels: ClassVar[int]
    outputs: ClassVar[int]  # width of the model's single output

    def __init__(self, model: OnnxModel, flip_average: bool = True) -> None:
        self.model = model
        self.flip_average = bool(flip_average)
        model.check_input((SIZE, SIZE, self.channels))
        shapes = [tuple(o.shape) for o in model.session.get_outputs()]
        if len(shapes) != 1 or shapes[0][-1] != self.outputs:
            raise ModelError(
                f"model {model.name} ({model.path}) gives outputs {shapes}, expected one [N, {self.outputs}] "
                f"for the {self.name} head: wrong model file?"
            )

    @staticmethod
    @abstractmethod
    def prepare(image_bgr: np.ndarray, faces: Faces) -> np.ndarray: ...

    def predict(self, crops: np.ndarray) -> Prediction:
        want = (SIZE, SIZE, self.channels)
        if crops.ndim != 4 or crops.shape[1:] != want or crops.dtype != np.float32:
            raise ValueError(
                f"{self.name} head: expected float32 crops (N, {SIZE}, {SIZE}, {self.channels}), "
                f"got {crops.dtype} {crops.shape}"
            )
        n = len(crops)
        if n == 0 or not self.flip_average:
            (output,) = self.model.run(crops)
            return self._decode(np.asarray(output).reshape(n, self.outputs))
        # crops and their mirror images in one batch; the mean of the two outputs (probabilities stay
        # probabilities, years stay years)
        (output,) = self.model.run(np.ascontiguousarray(np.concatenate([crops, crops[:, :, ::-1]])))
        output = np.asarray(output, np.float32).reshape(2 * n, self.outputs)
        return self._decode((output[:n] + output[n:]) * np.float32(0.5))

    def predict_arrays(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """{head name: the prediction's values} for sending to another process."""
        return {self.name: self.predict(crops).values}

    @abstractmethod
    def _decode(self, output: np.ndarray) -> Prediction: ...


class EmotionHead(AttributeHead):
    name = "emotion"
    channels = 1
    outputs = len(Emotion.LABELS)
    prepare = staticmethod(prepare_emotion)

    def _decode(self, output: np.ndarray) -> EmotionPrediction:
        return EmotionPrediction(output)


class GenderHead(AttributeHead):
    name = "gender"
    channels = 1
    outputs = len(GENDER_LABELS)
    prepare = staticmethod(prepare_gender)

    def _decode(self, output: np.ndarray) -> GenderPrediction:
        return GenderPrediction(output[:, 1])


class AgeHead(AttributeHead):
    name = "age"
    channels = 3
    outputs = 1
    prepare = staticmethod(prepare_age)

    def _decode(self, output: np.ndarray) -> AgePrediction:
        return AgePrediction(output[:, 0])


_HEAD_CLASSES: dict[str, type[AttributeHead]] = {"age": AgeHead, "gender": GenderHead, "emotion": EmotionHead}


def _check_name(name: str) -> str:
    if name not in _HEAD_CLASSES:
        raise ConfigError(f"unknown attribute head {name!r}; known heads: {', '.join(HEADS)}")
    return name


def create_attribute_head(
    name: str, registry: ModelRegistry, runtime_options: RuntimeOptions | None = None, flip_average: bool = True
) -> AttributeHead:
    """Resolve head `name`'s model through the registry (converting it once) and open its session."""
    cls = _HEAD_CLASSES[_check_name(name)]
    model = OnnxModel(registry.resolve(name), runtime_options or RuntimeOptions(), name=name)
    return cls(model, flip_average)
