"""One settings tree: defaults < YAML < STREAMER_ env vars < flags; bad values name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.config import load_settings
from streamer.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("STREAMER_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize("name", ["default.yaml", "webcam.yaml", "cctv.yaml"])
def test_shipped_configs_load(name):
    settings = load_settings(CONFIGS / name)
    assert settings.publish.include_crops is False and settings.publish.include_embeddings is False
    if name == "cctv.yaml":
        assert [s.id for s in settings.sources] == ["entrance", "lobby", "car_park"]
        assert all(s.url.startswith("rtsp://") for s in settings.sources)


def test_precedence_yaml_env_flags(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("detector:\n  name: blazeface\n  max_side: 800\ninference:\n  max_batch: 8\n")
    assert load_settings(config).detector.name == "blazeface"
    monkeypatch.setenv("STREAMER_DETECTOR__MAX_SIDE", "960")
    monkeypatch.setenv("STREAMER_MODEL_DIR", str(tmp_path))
    settings = load_settings(config, {"inference": {"max_batch": 16}})
    assert settings.detector.name == "blazeface"  # from YAML, untouched by the others
    assert settings.detector.max_side == 960  # env beats YAML
    assert settings.inference.max_batch == 16  # flags beat everything
    assert settings.model_dir == tmp_path


@pytest.mark.parametrize(
    "yaml_text, env, setting",
    [
        ("detector:\n  name: haar\n", {}, "detector.name"),
        ("tracker:\n  low_threshold: 0.8\n", {}, "tracker"),
        ("sources:\n  - url: a.mp4\n    id: cam.1\n", {}, "sources.0.id"),
        ("publish:\n  endpoint: localhost:5556\n", {}, "publish.endpoint"),
        ("inference:\n  max_batch: 0\n", {}, "inference.max_batch"),
        ("nonsense: 1\n", {}, "nonsense"),
        ("", {"STREAMER_RECOGNITION__VOTE_SHARE": "0.4"}, "recognition.vote_share"),
        ("", {"STREAMER_RUNTIME__DEVICE": "tpu"}, "runtime.device"),
    ],
)
def test_bad_values_name_the_setting(tmp_path, monkeypatch, yaml_text, env, setting):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=f"setting {setting}"):
        load_settings(config)


def test_unreadable_or_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_settings(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("detector: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listing)
