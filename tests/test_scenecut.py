"""SceneCutDetector on synthetic shots: smooth colour textures, jittered the way a camera jitters."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from streamer.track.scenecut import SceneCutDetector

HEIGHT, WIDTH = 360, 640


def shot(mean_bgr: tuple[int, int, int], seed: int, spread: float = 40.0) -> np.ndarray:
    """A smooth random colour texture around `mean_bgr`.

    Textured on purpose, like camera footage: with large flat single-colour areas a whole histogram
    spike sits on a bin edge, and a uniform brightness step of 8 levels alone already crosses the
    default threshold (measured: 0.31-0.35), which is not what these tests are about.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 1.0, (HEIGHT // 16, WIDTH // 16, 3))
    texture = cv2.GaussianBlur(cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC), (0, 0), 6)
    return np.clip(np.array(mean_bgr, float) + spread * texture / texture.std(), 0, 255).astype(np.uint8)


def jittered(image: np.ndarray, rng: np.random.Generator, brightness: float, noise: float) -> np.ndarray:
    out = image.astype(np.float64) + brightness + rng.normal(0.0, noise, image.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


SKY = (170, 130, 90)  # BGR: blue-grey
BRICK = (60, 60, 170)  # red
FOREST = (60, 160, 60)  # green


@pytest.mark.parametrize(
    "frame",
    [shot(SKY, 0), np.zeros((HEIGHT, WIDTH, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)],
    ids=["texture", "black", "tiny-white"],
)
def test_the_first_frame_is_never_a_cut(frame):
    assert SceneCutDetector().is_cut(frame) is False


def test_noise_brightness_and_small_pans_within_a_shot_are_not_cuts():
    rng = np.random.default_rng(11)
    base = shot(SKY, 0)
    detector = SceneCutDetector()
    detector.is_cut(base)
    cuts = []
    for i in range(40):
        # auto-exposure drift up to +-8 levels, sensor noise, a slow pan of a few pixels per frame
        frame = np.roll(base, shift=3 * i, axis=1)
        cuts.append(detector.is_cut(jittered(frame, rng, brightness=float(rng.uniform(-8, 8)), noise=3.0)))
    assert not any(cuts)


@pytest.mark.parametrize(("before", "after"), [(SKY, BRICK), (BRICK, FOREST), (FOREST, SKY)])
def test_a_switch_to_a_differently_coloured_scene_is_a_cut_once(before, after):
    rng = np.random.default_rng(5)
    detector = SceneCutDetector()
    first, second = shot(before, 1), shot(after, 2)
    results = [detector.is_cut(jittered(image, rng, 0.0, 2.0)) for image in (first, first, second, second, second)]
    assert results == [False, False, True, False, False]  # the cut frame only, not the shot after it


def test_reset_forgets_the_previous_frame():
    detector = SceneCutDetector()
    detector.is_cut(shot(SKY, 0))
    detector.reset()
    assert detector.is_cut(shot(BRICK, 1)) is False  # first frame again
    assert detector.is_cut(shot(SKY, 0)) is True  # but it keeps working after the reset


def test_threshold_sets_the_sensitivity():
    a, b = shot(SKY, 0), shot(SKY, 3)  # same colours, another texture: a small histogram change
    strict, loose = SceneCutDetector(threshold=0.01), SceneCutDetector(threshold=1.0)
    for detector in (strict, loose):
        detector.is_cut(a)
    assert strict.is_cut(b) is True and loose.is_cut(b) is False


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, 5.0, math.nan])
def test_bad_thresholds_raise(threshold):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        SceneCutDetector(threshold=threshold)

