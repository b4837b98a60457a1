"""The one embedding-distance implementation: agreement with scipy's cdist (what verify used before),
edge cases, and that the embedder spec and the gallery matcher both give its numbers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from streamer.infer.align import ARCFACE_112, DLIB_150
from streamer.infer.embedders import EmbedderSpec
from streamer.match.distance import (
    METRICS,
    PreparedGallery,
    check_metric,
    l2_normalise,
    pairwise,
    prepare_gallery,
)
from streamer.match.gallery import Gallery
from streamer.match.matcher import Matcher


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


# dlib descriptors share a large common part: norms ~1.4 on the shared photos, people ~0.7-1 apart.
_DLIB_CENTRE = np.random.default_rng(0).normal(0.0, 0.115, 128)


def dlib_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """128-D raw vectors on the scale of dlib descriptors."""
    return (_DLIB_CENTRE + rng.normal(0.0, 0.05, (n, 128))).astype(np.float32)


def arcface_like(rng: np.random.Generator, n: int) -> np.ndarray:
    return l2_normalise(rng.normal(size=(n, 512)).astype(np.float32))


def near(rng: np.random.Generator, rows: np.ndarray, noise: float) -> np.ndarray:
    return (rows + rng.normal(0.0, noise, rows.shape)).astype(np.float32)


# -- agreement with cdist -------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("make", [dlib_like, arcface_like], ids=["dlib-like", "arcface-like"])
def test_matches_cdist(rng, metric, make):
    gallery = make(rng, 300)
    # strangers, and same-person-like copies of gallery rows (~0.35 dlib, ~0.2 cosine: near the thresholds)
    queries = np.vstack([make(rng, 40), near(rng, gallery[:40], 0.03)])
    ours = pairwise(queries, gallery, metric)
    reference = cdist(queries.astype(np.float64), gallery.astype(np.float64), metric=metric)
    assert ours.shape == (80, 300) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    # the same through a prepared gallery
    np.testing.assert_array_equal(pairwise(queries, prepare_gallery(gallery, metric), metric), ours)


@pytest.mark.parametrize("metric", METRICS)
def test_verify_decisions_match_cdist(rng, metric):
    """Same/different at the threshold is what verify reports: not one decision may flip."""
    gallery = dlib_like(rng, 200) if metric == "euclidean" else arcface_like(rng, 200)
    threshold = float(np.median(cdist(gallery[:50], gallery[50:], metric=metric)))
    ours = pairwise(gallery[:50], gallery[50:], metric)
    reference = cdist(gallery[:50].astype(np.float64), gallery[50:].astype(np.float64), metric=metric)
    decided_apart = np.abs(reference - threshold) > 1e-5  # pairs away from the threshold's rounding
    assert np.array_equal((ours < threshold)[decided_apart], (reference < threshold)[decided_apart])


# -- edge cases -----------------------------------------------------------------------------------


def test_cosine_lies_in_0_2_and_handles_zero_vectors():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    d = pairwise(x, np.array([[3.0, 4.0], [-3.0, -4.0], [6.0, 8.0], [0.0, 0.0]]), "cosine")
    np.testing.assert_allclose(d[0], [0.0, 2.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(d[1], [1.0, 1.0, 1.0, 1.0])  # a zero vector is no closer to anything
    assert d.min() >= 0.0 and d.max() <= 2.0


def test_euclidean_is_raw_and_never_nan_for_identical_vectors(rng):
    a = np.array([[3.0, 4.0]], np.float32)
    np.testing.assert_allclose(pairwise(a, np.array([[0.0, 0.0], [6.0, 8.0]]), "euclidean"), [[5.0, 5.0]])
    vectors = dlib_like(rng, 50)
    self_distances = np.diag(pairwise(vectors, vectors, "euclidean"))
    # Not exactly 0: float32 cancellation in the expansion (~1e-3 at dlib's scale, the same as the
    # matcher always had), far below any threshold; max(0, .) keeps the sqrt from giving NaN.
    assert np.isfinite(self_distances).all() and self_distances.max() < 5e-3


@pytest.mark.parametrize(
    ("queries", "gallery", "metric", "error"),
    [
        (np.ones((2, 3)), np.ones((4, 3)), "manhattan", "metric: expected one of euclidean, cosine"),
        (np.ones((2, 3)), np.ones((4, 5)), "cosine", r"one length, got \(2, 3\) and \(4, 5\)"),
        (np.ones(3), np.ones((4, 3)), "euclidean", r"queries: expected an array of shape \(N, D\), got \(3,\)"),
        (np.ones((2, 3)), np.ones((1, 4, 3)), "euclidean", r"gallery: expected an array of shape \(N, D\)"),
        (np.ones((2, 3)), prepare_gallery(np.ones((4, 3)), "cosine"), "euclidean", "prepared for cosine"),
    ],
    ids=["metric", "length", "queries-1d", "gallery-3d", "prepared-other-metric"],
)
def test_bad_input_raises(queries, gallery, metric, error):
    with pytest.raises(ValueError, match=error):
        pairwise(queries, gallery, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("n", "m"), [(0, 3), (2, 0), (0, 0)])
def test_empty_sides(metric, n, m):
    out = pairwise(np.ones((n, 4)), np.ones((m, 4)), metric)
    assert out.shape == (n, m) and out.dtype == np.float32


def test_check_metric_and_prepared_gallery():
    assert [check_metric(m) for m in METRICS] == ["euclidean", "cosine"]
    g = np.array([[3.0, 4.0], [1.0, 0.0]])
    cosine, euclidean = prepare_gallery(g, "cosine"), prepare_gallery(g, "euclidean")
    assert isinstance(cosine, PreparedGallery) and len(cosine) == 2
    np.testing.assert_allclose(cosine.vectors, [[0.6, 0.8], [1.0, 0.0]])
    np.testing.assert_allclose(euclidean.vectors, g)
    np.testing.assert_allclose(euclidean.sq_norms, [25.0, 1.0])


# -- its users ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "template", "make"), [("euclidean", DLIB_150, dlib_like), ("cosine", ARCFACE_112, arcface_like)]
)
def test_embedder_spec_distances_are_pairwise(rng, metric, template, make):
    vectors = make(rng, 20)
    spec = EmbedderSpec(id="t", template=template, metric=metric, threshold=0.6, dim=vectors.shape[1])
    np.testing.assert_array_equal(spec.distances(vectors[:5], vectors), pairwise(vectors[:5], vectors, metric))
    one = float(pairwise(vectors[:1], vectors[1:2], metric)[0, 0])
    assert spec.distance(vectors[0], vectors[1]) == pytest.approx(one)


@pytest.mark.parametrize(("metric", "make"), [("euclidean", dlib_like), ("cosine", arcface_like)])
def test_matcher_gives_the_per_person_minimum_of_pairwise(tmp_path, rng, metric, make):
    vectors = make(rng, 30)
    names = [f"p{i % 7}" for i in range(30)]  # interleaved on purpose: the matcher groups them
    with Gallery(tmp_path / "g.db") as gallery:
        for name, vector in zip(names, vectors):
            gallery.add(name, vector[None], "emb")
        matcher = Matcher(gallery, "emb", metric, 0.6)
        queries = np.vstack([make(rng, 4), near(rng, vectors[:4], 0.01)])
        people, dist = matcher.distances(queries)
    full = pairwise(queries, vectors, metric)
    expected = np.stack([full[:, [i for i, n in enumerate(names) if n == p]].min(axis=1) for p in people], axis=1)
    np.testing.assert_allclose(dist, expected, atol=1e-6)
