"""The one model factory: every process gets its models here, with the runtime settings applied."""

from __future__ import annotations

import pytest

from streamer.config import Settings
from streamer.errors import ModelError
from streamer.models.factory import ModelFactory
from streamer.models.registry import sha256_of


def threads(model) -> int:
    return model.session.get_session_options().intra_op_num_threads


@pytest.fixture()
def settings_for(model_dir, cache_dir):
    def make(**sections) -> Settings:
        return Settings(model_dir=model_dir, models={"cache_dir": cache_dir, "allow_noncommercial": True}, **sections)

    return make


@pytest.mark.parametrize("detector", ["yunet", "scrfd_500m"])
def test_runtime_threads_reach_detectors_and_inference_models(settings_for, detector):
    factory = ModelFactory(settings_for(runtime={"threads": 3}, detector={"name": detector}))
    with factory.detector() as made:
        assert threads(made.model) == 3
    assert threads(factory.embedder().model) == 3
    assert all(threads(head.model) == 3 for head in factory.heads().values())


def test_default_threads_keep_detection_on_one_core(settings_for):
    factory = ModelFactory(settings_for())
    with factory.detector() as made:
        assert threads(made.model) == 1  # it shares the detect worker with decoding
    assert all(threads(head.model) == 1 for head in factory.heads().values())  # too small to split


def test_default_embedder_threads_follow_the_cores(settings_for, monkeypatch):
    import streamer.models.factory as factory_module

    for cpus, expected in ((2, 1), (8, 0)):  # 0: onnxruntime's choice
        monkeypatch.setattr(factory_module, "cores", lambda cpus=cpus: cpus)
        assert threads(ModelFactory(settings_for()).embedder().model) == expected


def test_for_tracking_detects_down_to_the_tracker_low_bar(settings_for):
    factory = ModelFactory(settings_for(tracker={"low_threshold": 0.2, "high_threshold": 0.6}))
    with factory.detector(for_tracking=True) as tracking, factory.detector() as plain:
        assert tracking.score_threshold == 0.2 and plain.score_threshold == 0.6


def test_embedder_spec_and_hash_without_a_session(settings_for):
    factory = ModelFactory(settings_for())
    spec = factory.embedder_spec
    assert spec.metric == "euclidean" and spec.chip_size == 150
    assert factory.embedder_sha256 == sha256_of(factory.embedder_path) and len(factory.embedder_sha256) == 64


def test_resolve_all_fails_with_one_line_naming_the_model(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    factory = ModelFactory(Settings(model_dir=empty, models={"cache_dir": tmp_path / "cache"}))
    with pytest.raises(ModelError) as error:
        factory.resolve_all()
    assert "yunet" in str(error.value) and "\n" not in str(error.value)
