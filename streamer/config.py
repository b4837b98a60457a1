"""One settings tree for everything: defaults < YAML file < STREAMER_... env vars < command-line flags.

Nested settings use a double underscore in env vars (STREAMER_DETECTOR__NAME=blazeface);
STREAMER_MODEL_DIR is the one flat alias because tests, CI and users set it most.
Every bad value fails at start-up with a message naming the setting (see `load_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from streamer.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    cache_dir: Path | None = None  # default ~/.cache/streamer
    paths: dict[str, Path] = {}  # explicit file per model name, e.g. {"yunet": "/opt/yunet.onnx"}
    allow_download: bool = False
    allow_noncommercial: bool = False  # SCRFD and other research-only models are opt-in


class RuntimeSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(
        0, ge=0, le=256,
        description="onnxruntime intra-op threads per session, detectors included; 0 = onnxruntime's choice for "
        "the inference models and 1 for the detector (it shares its process with decoding)",
    )


class DetectorSettings(_Section):
    name: Literal["yunet", "blazeface", "scrfd_500m", "scrfd_2.5g"] = "yunet"
    # YuNet through onnxruntime gives the same faces as cv2.FaceDetectorYN (tested) at ~2.4x the speed on
    # CPU; "opencv" keeps OpenCV's own implementation.
    backend: Literal["onnxruntime", "opencv"] = "onnxruntime"
    interval: int = Field(
        1, ge=1, le=10, description="streams: detect on every n-th frame, the tracker predicts in between"
    )
    score_threshold: float = Field(0.6, gt=0.0, lt=1.0)
    nms_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    max_side: int = Field(640, ge=64, description="detect on a copy whose longer side is at most this")
    min_face: int = Field(20, ge=0, description="drop faces smaller than this (pixels, shorter box side)")


class EmbedderSettings(_Section):
    name: str = "dlib_resnet"  # a registry model name, or "arcface" with models.paths.arcface set
    threshold: float | None = Field(None, gt=0.0, description="override the embedder's calibrated distance")


class AttributeSettings(_Section):
    enabled: list[Literal["age", "gender", "emotion"]] = ["age", "gender", "emotion"]


class GallerySettings(_Section):
    path: Path | None = None


class SourceSettings(_Section):
    url: str
    id: str | None = None  # stream id in events; defaults to cam0, cam1, ... in order
    live: bool | None = None  # None: decided from the URL (rtsp/http/webcam/lavfi are live)
    fps: float | None = Field(None, gt=0, description="sample a file to this rate; None = every frame")
    loop: bool = False  # replay a file forever (demos)
    max_frames: int | None = Field(None, gt=0, description="stop after this many frames; None = no limit")

    @field_validator("id")
    @classmethod
    def _id_is_topic_safe(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in " .*\t\n")):
            raise ValueError("stream id must be non-empty, without spaces, dots or * (it is part of the topic)")
        return value


class ReconnectSettings(_Section):
    initial_delay_s: float = Field(0.5, gt=0)
    max_delay_s: float = Field(10.0, gt=0)
    frame_timeout_s: float = Field(3.0, gt=0, description="a live source with no new frame this long is lost")
    open_timeout_s: float = Field(5.0, gt=0)
    # At start-up, when not one source can be opened, the likeliest cause is a wrong address: exit with
    # one line saying so. A source that connected once, or one of several while others work, is retried
    # forever. False retries forever from the start (a service that may boot before its cameras).
    exit_if_none_connect: bool = True


class TrackerSettings(_Section):
    high_threshold: float = Field(0.6, gt=0, lt=1)
    low_threshold: float = Field(0.3, gt=0, lt=1)
    match_iou: float = Field(0.2, gt=0, lt=1, description="minimum IoU to continue a track")
    min_hits: int = Field(3, ge=1, description="detections before a track is born")
    max_missed: int = Field(30, ge=1, description="missed frames before a track ends")
    scene_cut_threshold: float = Field(
        0.25, ge=0, le=1, description="end every track at a shot cut (edited video); 0 turns it off"
    )

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> TrackerSettings:
        if self.low_threshold >= self.high_threshold:
            raise ValueError("low_threshold must be below high_threshold")
        return self


class RecognitionSettings(_Section):
    refresh_s: float = Field(2.0, gt=0, description="re-embed a live track this often")
    warmup_refresh_s: float = Field(
        0.3, gt=0, description="faster refresh until a track has min_votes recognitions, so names come early"
    )
    max_per_track: int = Field(10, ge=1, description="cap on embeddings per track")
    better_quality_ratio: float = Field(1.3, ge=1, description="re-embed when face quality beats the best by this")
    min_votes: int = Field(2, ge=1, description="recognitions before a name is announced")
    vote_share: float = Field(0.6, gt=0.5, le=1, description="share of votes a name needs")


class InferenceSettings(_Section):
    max_batch: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0)
    # Client side (`streamer run` using a remote `streamer inference-worker`). The two key files come from
    # `streamer keys generate` on the worker host; declared before `endpoint`, whose check needs them.
    server_key: Path | None = None  # the worker's public key file (DIR/server.key)
    client_key: Path | None = Field(None, validate_default=True)  # this host's secret key (DIR/clients/NAME.key_secret)
    endpoint: str | None = None  # tcp://HOST:PORT or ipc://PATH of a remote inference worker; None = a local one
    # Server side (`streamer inference-worker`): where it listens, and its keys folder, required beyond loopback.
    keys: Path | None = None
    bind: str = "tcp://127.0.0.1:5560"

    @staticmethod
    def _check_address(value: str, bind: bool) -> None:
        import re

        host = r"\*|[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]" if bind else r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]"
        port = r"\*|\d{1,5}" if bind else r"\d{1,5}"
        match = re.fullmatch(rf"tcp://(?:{host}):({port})", value)
        if match and (match.group(1) == "*" or 1 <= int(match.group(1)) <= 65535):
            return
        if value.startswith("ipc://") and len(value) > len("ipc://"):
            return
        raise ValueError(f"expected tcp://HOST:PORT with a port 1-65535{' (or *)' if bind else ''}, or ipc://PATH")

    @field_validator("server_key", "keys")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("client_key")
    @classmethod
    def _key_pair(cls, value: Path | None, info: Any) -> Path | None:
        value = None if value is None else value.expanduser()
        if "server_key" in info.data and (info.data["server_key"] is None) != (value is None):
            if value is None:
                raise ValueError(
                    "inference.server_key is set, so this must be too: this host's secret key file "
                    "(clients/NAME.key_secret from `streamer keys generate`)"
                )
            raise ValueError(
                "needs inference.server_key too: the worker's public key file "
                "(server.key from `streamer keys generate`)"
            )
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint_form(cls, value: str | None, info: Any) -> str | None:
        from streamer.sockets import is_loopback

        if value is None:
            return None
        cls._check_address(value, bind=False)
        keys_known = {"server_key", "client_key"} <= info.data.keys()
        if keys_known and info.data["client_key"] is None and not is_loopback(value):
            raise ValueError(
                f"{value} is beyond this machine, so the link needs CURVE keys: set inference.server_key and "
                "inference.client_key (make them on the worker host with `streamer keys generate DIR`)"
            )
        return value

    @field_validator("bind")
    @classmethod
    def _bind_form(cls, value: str, info: Any) -> str:
        from streamer.sockets import is_loopback, needs_keys_message

        cls._check_address(value, bind=True)
        if "keys" in info.data and info.data["keys"] is None and not is_loopback(value):
            raise ValueError(needs_keys_message(value, "inference.keys"))
        return value


class PublishSettings(_Section):
    # A keys folder from `streamer keys generate`, required when `endpoint` listens beyond loopback (declared
    # first: the endpoint check needs it). Its files are read when the socket is made, at start-up.
    keys: Path | None = None
    endpoint: str = "tcp://127.0.0.1:5556"
    sndhwm: int = Field(10_000, ge=1)
    heartbeat_s: float = Field(5.0, gt=0)
    include_crops: bool = False  # privacy: face crops stay in the process unless turned on
    include_embeddings: bool = False  # privacy: embeddings stay in the process unless turned on
    track_update_s: float = Field(1.0, ge=0, description="throttle for track.updated events; 0 = off")

    @field_validator("keys")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("endpoint")
    @classmethod
    def _endpoint_scheme(cls, value: str, info: Any) -> str:
        from streamer.sockets import is_loopback, needs_keys_message

        if not value.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError("must start with tcp://, ipc:// or inproc://")
        if "keys" in info.data and info.data["keys"] is None and not is_loopback(value):
            raise ValueError(needs_keys_message(value, "publish.keys"))
        return value


class OutputSettings(_Section):
    path: Path | None = None  # annotated video (.mp4); with several streams, one file per stream
    blur_unknown: bool = False
    preview: bool = False  # a window, only when a display exists


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    model_dir: Path | None = Field(None, validation_alias=AliasChoices("model_dir", "STREAMER_MODEL_DIR"))
    models: ModelSettings = ModelSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    detector: DetectorSettings = DetectorSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    attributes: AttributeSettings = AttributeSettings()
    gallery: GallerySettings = GallerySettings()
    sources: list[SourceSettings] = []
    reconnect: ReconnectSettings = ReconnectSettings()
    tracker: TrackerSettings = TrackerSettings()
    recognition: RecognitionSettings = RecognitionSettings()
    inference: InferenceSettings = InferenceSettings()
    publish: PublishSettings = PublishSettings()
    output: OutputSettings = OutputSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_source = _YamlSource(settings_cls, _YAML_FILE.get("path"))
        return (init_settings, env_settings, yaml_source)


_YAML_FILE: dict[str, Path | None] = {}


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"config file {self.path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {self.path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {self.path} must hold a mapping of settings")
        return data


def _nested_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _nested_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings tree or raise ConfigError naming the first bad setting.

    `overrides` are command-line flags: a nested dict merged over YAML and env values.
    """
    _YAML_FILE["path"] = Path(config_file) if config_file else None
    try:
        if overrides:
            # Flags must beat env vars, but a partial section given as init kwargs would replace the
            # whole env/YAML section, so build once without flags and merge them in.
            base = Settings().model_dump(exclude_unset=False, by_alias=False)
            return Settings(**_nested_update(base, overrides))
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _YAML_FILE.pop("path", None)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        env = "STREAMER_" + "__".join(str(p).upper() for p in error["loc"] if not isinstance(p, int))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        problems.append(f"setting {where} ({env}): {message} (got {error.get('input')!r})")
    return "; ".join(problems)
