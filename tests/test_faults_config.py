"""Hostile or careless settings: each fails at start in one bounded line naming the setting, file or variable.

Before: a 272-byte YAML file of nested aliases printed a 39 MB error line (nine levels: 875 MB of memory),
a Latin-1 config file and STREAMER_ATTRIBUTES__ENABLED=age ended in tracebacks, and counts had no upper
bound (runtime.threads=100000 hung with 3 GB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.config import MAX_CONFIG_BYTES, load_settings
from streamer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
VIDEO = REPO / "sample_videos" / "astronaut.mp4"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("STREAMER_"):
            monkeypatch.delenv(key)


def laughs(levels: int) -> str:
    """The "billion laughs": each level is nine aliases of the one before (9**levels strings)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def refused(tmp_path: Path, text: str | bytes, env: dict[str, str] | None = None) -> str:
    config = tmp_path / "bad.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    for key, value in (env or {}).items():
        os.environ[key] = value  # clean_env's monkeypatch restores the environment
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 1000, message[:2000]
    return message


# -- YAML that expands, nests or is not text ----------------------------------------------------------------------


def test_aliases_are_refused_before_they_expand(tmp_path):
    started = time.perf_counter()
    message = refused(tmp_path, laughs(7))  # 4.8 million strings once expanded
    assert time.perf_counter() - started < 1.0
    assert "bad.yaml is not valid YAML: anchors and aliases" in message and "line 1, column 5" in message


@pytest.mark.parametrize(
    "text",
    [
        "detector: &d {name: yunet}\n",  # an anchor alone: refused at once, no alias needed to cost anything
        "base: &b {max_side: 800}\ndetector:\n  <<: *b\n",  # a merge key is an alias
        "sources:\n  - &s {url: a.mp4}\n  - *s\n",
    ],
)
def test_anchors_aliases_and_merge_keys_are_refused(tmp_path, text):
    assert "anchors and aliases (&name, *name, <<: *name) are not allowed" in refused(tmp_path, text)


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    message = refused(tmp_path, "[" * 100_000 + "\n")
    assert "nested more than 32 levels deep" in message


def test_a_huge_file_is_refused_unread(tmp_path):
    message = refused(tmp_path, "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    assert "is over 1 MiB" in message


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("detector:\n  name: blazéface\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 on line 2, offset 22)"),
        (b"detector:\n  name: yunet\n\xff\xfe\n", "is not UTF-8 text (byte 0xff on line 3, offset 24)"),
        (b"detector:\n  name: yu\x00net\n", "character #x0000"),
    ],
)
def test_non_utf8_config_names_the_file_and_the_remedy(tmp_path, data, words):
    message = refused(tmp_path, data)
    assert message.startswith(f"config file {tmp_path / 'bad.yaml'} ") and words in message
    if "UTF-8" in words:
        assert "save it as UTF-8" in message


def test_utf16_with_a_byte_order_mark_still_loads(tmp_path):
    """What Windows PowerShell's `>` writes: YAML allows it, so it is read, not refused."""
    config = tmp_path / "utf16.yaml"
    config.write_bytes("detector:\n  name: blazeface\n".encode("utf-16"))
    assert load_settings(config).detector.name == "blazeface"


def test_a_number_python_refuses_to_parse_is_one_line(tmp_path):
    message = refused(tmp_path, "detector:\n  max_side: " + "9" * 5000 + "\n")
    assert "holds a value that cannot be read: Exceeds the limit (4300 digits)" in message


# -- echoed values are bounded ---------------------------------------------------------------------------------


def test_long_values_are_truncated_in_the_message(tmp_path):
    message = refused(tmp_path, "detector:\n  name: " + "x" * 100_000 + "\n")
    assert message.startswith("setting detector.name (STREAMER_DETECTOR__NAME): Input should be 'yunet'")
    assert len(message) < 500


def test_many_errors_are_counted_not_listed(tmp_path):
    text = "sources:\n" + "".join(f"  - {{url: a{i}.mp4, fps: -1}}\n" for i in range(200))
    message = refused(tmp_path, text)
    assert message.count("setting sources.") == 5 and message.endswith("and 195 more problems")


# -- counts and durations have upper bounds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("runtime.threads", 100_000),
        ("detector.max_side", 100_000),
        ("detector.min_face", 100_000),
        ("tracker.min_hits", 10**9),
        ("tracker.max_missed", 10**9),
        ("recognition.max_per_track", 10**9),
        ("recognition.min_votes", 10**9),
        ("recognition.refresh_s", 1e12),
        ("recognition.better_quality_ratio", 1e12),
        ("inference.max_batch", 10**6),
        ("inference.max_wait_ms", 1e9),
        ("publish.sndhwm", 10**9),
        ("publish.heartbeat_s", 1e12),
        ("publish.track_update_s", 1e12),
        ("reconnect.max_delay_s", 1e300),  # time.sleep(1e300) raises OverflowError
        ("reconnect.frame_timeout_s", 1e12),
        ("reconnect.open_timeout_s", 1e12),
        ("reconnect.initial_delay_s", 1e12),
        ("limits.max_image_pixels", 10**12),
    ],
)
def test_counts_and_durations_have_upper_bounds(monkeypatch, setting, value):
    env = "STREAMER_" + setting.upper().replace(".", "__")
    monkeypatch.setenv(env, str(value))
    with pytest.raises(ConfigError, match=rf"^setting {setting} \({env}\): Input should be less than or equal to"):
        load_settings()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_infinite_and_nan_durations_are_refused(monkeypatch, value):
    monkeypatch.setenv("STREAMER_RECONNECT__MAX_DELAY_S", value)
    with pytest.raises(ConfigError, match=r"^setting reconnect\.max_delay_s .*finite number"):
        load_settings()


def test_more_than_256_sources_are_refused(tmp_path):
    text = "sources:\n" + "".join(f"  - {{url: a{i}.mp4}}\n" for i in range(257))
    assert refused(tmp_path, text).startswith("setting sources (STREAMER_SOURCES): List should have at most 256")


def test_the_bounds_keep_the_shipped_configs_and_defaults_valid():
    for name in ("default.yaml", "webcam.yaml", "cctv.yaml"):
        load_settings(REPO / "configs" / name)
    load_settings()


# -- environment variables holding lists ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("age", ["age"]),  # before: SettingsError traceback (pydantic-settings wants JSON)
        ("age,gender", ["age", "gender"]),
        (" age , emotion ", ["age", "emotion"]),
        ('["gender"]', ["gender"]),
        ("", []),  # set and empty: no attribute heads
    ],
)
def test_attributes_enabled_takes_commas_or_json(monkeypatch, value, expected):
    monkeypatch.setenv("STREAMER_ATTRIBUTES__ENABLED", value)
    assert load_settings().attributes.enabled == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("age,height", "setting attributes.enabled.1 (STREAMER_ATTRIBUTES__ENABLED): Input should be 'age'"),
        ('["age"', 'expected names separated by commas (age,gender) or JSON ["age","gender"]'),
    ],
)
def test_bad_attribute_lists_name_the_variable(monkeypatch, value, words):
    monkeypatch.setenv("STREAMER_ATTRIBUTES__ENABLED", value)
    with pytest.raises(ConfigError, match=r"^setting attributes\.enabled") as caught:
        load_settings()
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "example"),
    [
        ("STREAMER_SOURCES", "rtsp://admin:secret@cam/1", """STREAMER_SOURCES='[{"url": "rtsp://camera/stream1", """),
        ("STREAMER_MODELS__PATHS", "yunet=/opt/y.onnx", """STREAMER_MODELS__PATHS='{"yunet": "/opt/models"""),
        ("STREAMER_DETECTOR", "blazeface", """STREAMER_DETECTOR='{"name": "yunet"}'"""),
    ],
)
def test_json_valued_variables_that_are_not_json_name_the_variable(monkeypatch, name, value, example):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"environment variable {name} is not JSON, which this setting takes: e.g. {example}")
    assert value not in message  # not echoed: camera URLs carry passwords


# -- stream ids become topics and file names ------------------------------------------------------------------------


@pytest.mark.parametrize("stream_id", ["a/b", "..", "../etc", "c:\\x", "", "cam 1", "cam\t1", "x" * 101, "a\x07"])
def test_stream_ids_that_are_not_safe_file_names_are_refused(tmp_path, stream_id):
    # A JSON string is a YAML double-quoted scalar, escapes included.
    message = refused(tmp_path, f"sources:\n  - url: a.mp4\n    id: {json.dumps(stream_id)}\n")
    assert message.startswith("setting sources.0.id (STREAMER_SOURCES__ID): stream id must be 1-100 characters")


@pytest.mark.parametrize("stream_id", ["entrance", "car_park", "cam-2", "Eingang_Süd"])
def test_ordinary_stream_ids_still_load(tmp_path, stream_id):
    config = tmp_path / "ok.yaml"
    config.write_text(f"sources:\n  - url: a.mp4\n    id: {stream_id}\n", encoding="utf-8")
    assert load_settings(config).sources[0].id == stream_id


# -- through the real entry point: one line, no traceback, non-zero exit -------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "words"),
    [
        (laughs(7), {}, "anchors and aliases"),
        ("detector:\n  name: blazéface\n".encode("latin-1"), {}, "is not UTF-8 text"),
        ("[" * 100_000, {}, "nested more than 32 levels"),
        ("sources:\n  - url: a.mp4\n    id: a/b\n", {}, "setting sources.0.id"),
        ("", {"STREAMER_ATTRIBUTES__ENABLED": "age,height"}, "setting attributes.enabled.1"),
    ],
)
def test_streamer_run_with_a_bad_config_prints_one_line(tmp_path, text, env, words):
    config = tmp_path / "bad.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    done = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(config), str(VIDEO)],
        env={**clean, **env}, capture_output=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    err = done.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in err, err[:3000]
    assert len(lines) == 1 and lines[0].startswith("streamer: error: ") and words in lines[0], err[:3000]
    assert len(err) < 1000
