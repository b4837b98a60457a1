"""One settings tree for everything: defaults < YAML file < STREAMER_... env vars < command-line flags.

Nested settings use a double underscore in env vars (STREAMER_DETECTOR__NAME=blazeface);
STREAMER_MODEL_DIR is the one flat alias because tests, CI and users set it most.
Every bad value fails at start-up with a message naming the setting (see `load_settings`).
"""

from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from streamer.errors import ConfigError


class _Section(BaseModel):
    # inf and nan pass `gt=0` checks (nan compares false both ways) and then break sleep() and timeouts.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSettings(_Section):
    cache_dir: Path | None = None  # default ~/.cache/streamer
    paths: dict[str, Path] = {}  # explicit file per model name, e.g. {"yunet": "/opt/yunet.onnx"}
    allow_download: bool = False
    allow_noncommercial: bool = False  # SCRFD and other research-only models are opt-in


class RuntimeSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(
        0, ge=0, le=256,
        description="onnxruntime intra-op threads per session, detectors included; 0 = 1 for the detector (it "
        "shares its process with decoding) and the attribute heads (too small to split), and for the embedder "
        "onnxruntime's choice (1 on 2 cores or fewer)",
    )


class DetectorSettings(_Section):
    name: Literal["yunet", "blazeface", "scrfd_500m", "scrfd_2.5g"] = "yunet"
    # YuNet through onnxruntime gives the same faces as cv2.FaceDetectorYN (tested) at ~2.4x the speed on
    # CPU; "opencv" keeps OpenCV's own implementation.
    backend: Literal["onnxruntime", "opencv"] = "onnxruntime"
    # Adaptive detection (streamer.track.processor): every `interval`-th frame while a track is new or
    # uncertain, every `max_interval`-th while every track is stable; the Kalman filter predicts in between.
    interval: int = Field(
        1, ge=1, le=10,
        description="streams: detect on every n-th frame while a track is new or uncertain, predict in between",
    )
    # 10 (a third of a second at 30 fps): the cost of a camera falls to about half (README, "Adaptive
    # detection") with the same people named on the shared clips; 15 or 20 was no faster and split more tracks.
    max_interval: int | None = Field(
        10, ge=1, le=30,
        description="streams: detect only every n-th frame while every track is stable (newcomers are found "
        "within n frames); 1 or null: the same as interval (detection on every interval-th frame)",
    )
    # 5: the Kalman filter has learnt about 80% of a face's speed by then (50% after 3), so the boxes it
    # predicts while detection pauses stay on the face.
    stable_hits: int = Field(
        5, ge=1, le=1000,
        description="detections in a row, at a high score, before a track counts as stable (see max_interval)",
    )
    regions: bool = Field(
        True,
        description="streams, with max_interval: between full detections detect only around the tracks that "
        "want it (new, uncertain, due for inference) and let the Kalman filter carry the rest",
    )
    region_max_area: float = Field(
        0.35, gt=0.0, le=1.0,
        description="detect the whole frame instead when the regions would cover more than this share of it",
    )
    score_threshold: float = Field(0.6, gt=0.0, lt=1.0)
    nms_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    max_side: int = Field(640, ge=64, le=8192, description="detect on a copy whose longer side is at most this")
    min_face: int = Field(
        20, ge=0, le=8192, description="drop faces smaller than this (pixels, shorter box side)"
    )

    @model_validator(mode="after")
    def _intervals_ordered(self) -> DetectorSettings:
        if self.max_interval is not None and self.max_interval < self.interval:
            raise ValueError(f"max_interval ({self.max_interval}) must be at least interval ({self.interval})")
        return self


class EmbedderSettings(_Section):
    name: str = "dlib_resnet"  # a registry model name, or "arcface" with models.paths.arcface set
    threshold: float | None = Field(None, gt=0.0, description="override the embedder's calibrated distance")
    # Off: measured no gain for dlib's ResNet and more wrong accepts at its threshold (see
    # EmbedderSpec.flip_average). Same embedder id either way, so galleries stay usable.
    flip_average: bool = Field(False, description="embed each face and its mirror image, average the two")
    # A second detector pass on a view cut with the first alignment finds tilted faces' landmarks again
    # (streamer.infer.align.redetect_landmarks): on the shared pairs 99.30% -> 99.58% at the same threshold,
    # rotated copies 98.75% -> 99.17%, never worse. It costs about one more embedding per face, small next to
    # detecting on a whole photo but not next to a 30 fps stream, hence images only by default.
    redetect: Literal["off", "images", "all"] = Field(
        "images", description="refine landmarks with a second detector pass: off, images (verify/find/enrol), all"
    )


class AttributeSettings(_Section):
    # NoDecode: pydantic-settings would json.loads the env var and fail on the natural
    # STREAMER_ATTRIBUTES__ENABLED=age,gender with a traceback; the validator takes both forms.
    enabled: Annotated[list[Literal["age", "gender", "emotion"]], NoDecode] = ["age", "gender", "emotion"]
    # Below these the answer is null rather than a guess (for a track: on the smoothed probability).
    # Same values as streamer.infer.attributes.DEFAULT_MIN_*_CONFIDENCE (a test keeps them equal).
    min_gender_confidence: float = Field(0.7, ge=0.0, le=1.0, description="gender: null below this probability")
    min_emotion_confidence: float = Field(0.5, ge=0.0, le=1.0, description="emotion: null below this probability")
    min_emotion_readings: int = Field(
        2, ge=1, le=100, description="streams: a track's emotion stays null until it has this many readings"
    )

    @field_validator("enabled", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise ValueError('expected names separated by commas (age,gender) or JSON ["age","gender"]') from None
        return [name.strip() for name in text.split(",") if name.strip()]


class GallerySettings(_Section):
    """An SQLite file (`path`, the default) or a PostgreSQL database shared by many hosts (`url`), not both."""

    path: Path | None = None
    # postgresql://USER:PASSWORD@HOST:PORT/DB[?sslmode=verify-full]; secret (never echoed in errors or logs),
    # better from the environment (STREAMER_GALLERY__URL) or with the password in PGPASSWORD / ~/.pgpass.
    url: SecretStr | None = None

    @model_validator(mode="after")
    def _one_gallery(self) -> GallerySettings:
        # Raised as ConfigError, not ValueError: pydantic would echo the input, password and all.
        if self.url is None:
            return self
        if self.path is not None:
            raise ConfigError(
                "settings gallery.path and gallery.url are both set (STREAMER_GALLERY__PATH, STREAMER_GALLERY__URL): "
                "keep one, the SQLite file or the PostgreSQL URL"
            )
        from streamer.errors import GalleryError
        from streamer.match.gallery_pg import parse_url

        try:
            parse_url(self.url, "setting gallery.url (STREAMER_GALLERY__URL)")
        except GalleryError as exc:
            raise ConfigError(str(exc)) from None
        return self

    @field_serializer("url", when_used="json")
    def _reveal_for_workers(self, url: SecretStr | None) -> str | None:
        # The JSON form is how the pipeline hands its settings to its worker processes, which must connect.
        return None if url is None else url.get_secret_value()


class SourceSettings(_Section):
    url: str
    id: str | None = None  # stream id in events; defaults to cam0, cam1, ... in order
    live: bool | None = None  # None: decided from the URL (rtsp/http/webcam/lavfi are live)
    fps: float | None = Field(None, gt=0, le=1000, description="sample a file to this rate; None = every frame")
    loop: bool = False  # replay a file forever (demos)
    max_frames: int | None = Field(None, gt=0, description="stop after this many frames; None = no limit")

    @field_validator("id")
    @classmethod
    def _id_is_topic_safe(cls, value: str | None) -> str | None:
        # The id is part of the event topic and names the per-stream --output file, so a slash would
        # write outside the output folder and a dot would break topic prefixes.
        if value is not None and (
            not value
            or len(value) > 100
            or any(c in ".*/\\" or c.isspace() or not c.isprintable() for c in value)
        ):
            raise ValueError(
                "stream id must be 1-100 characters without spaces, dots, *, / or \\ "
                "(it is part of the event topic and of --output file names), e.g. entrance or cam_2"
            )
        return value


class ReconnectSettings(_Section):
    initial_delay_s: float = Field(0.5, gt=0, le=3600)
    max_delay_s: float = Field(10.0, gt=0, le=3600)
    frame_timeout_s: float = Field(
        3.0, gt=0, le=3600, description="a live source with no new frame this long is lost"
    )
    open_timeout_s: float = Field(5.0, gt=0, le=3600)
    # At start-up, when not one source can be opened, the likeliest cause is a wrong address: exit with
    # one line saying so. A source that connected once, or one of several while others work, is retried
    # forever. False retries forever from the start (a service that may boot before its cameras).
    exit_if_none_connect: bool = True


class TrackerSettings(_Section):
    high_threshold: float = Field(0.6, gt=0, lt=1)
    low_threshold: float = Field(0.3, gt=0, lt=1)
    match_iou: float = Field(0.2, gt=0, lt=1, description="minimum IoU to continue a track")
    min_hits: int = Field(3, ge=1, le=1000, description="detections before a track is born")
    # Every lost track is kept this many frames: the bound caps tracks held for crowds passing by.
    max_missed: int = Field(30, ge=1, le=10_000, description="missed frames before a track ends")
    scene_cut_threshold: float = Field(
        0.25, ge=0, le=1, description="end every track at a shot cut (edited video); 0 turns it off"
    )

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> TrackerSettings:
        if self.low_threshold >= self.high_threshold:
            raise ValueError("low_threshold must be below high_threshold")
        return self


class RecognitionSettings(_Section):
    refresh_s: float = Field(2.0, gt=0, le=3600, description="re-embed a live track this often")
    warmup_refresh_s: float = Field(
        0.3, gt=0, le=3600,
        description="faster refresh until a track has min_votes recognitions, so names come early",
    )
    max_per_track: int = Field(10, ge=1, le=1000, description="cap on embeddings per track")
    better_quality_ratio: float = Field(
        1.3, ge=1, le=100, description="re-embed when face quality beats the best by this"
    )
    min_votes: int = Field(2, ge=1, le=1000, description="recognitions before a name is announced")
    vote_share: float = Field(0.6, gt=0.5, le=1, description="share of votes a name needs")
    # Face quality (streamer.track.gate.face_quality: size x frontalness x sharpness, 0.008..1). A chip below
    # this does not vote at all (neither for a name nor for unknown): a burst of poor views must not flip a
    # known track to unknown or make a stranger of it. The default sits below every chip the gate picks on the
    # shared clips (lowest 0.040, Hamilton; median there 0.12, so 0.1 would already silence a third of its
    # chips): it only stops faces that are tiny, turned away and blurred at once (the floor is 0.2^3 = 0.008).
    min_quality: float = Field(0.03, ge=0, le=1, description="chips below this face quality cast no vote")
    # Stranger ids (streamer.match.strangers): unknown tracks clustered across streams, in memory only
    # unless strangers_file is set.
    unknown_ttl_s: float = Field(
        86_400, gt=0, le=366 * 86_400, description="a stranger not seen this long is forgotten (seconds)"
    )
    max_strangers: int = Field(1000, ge=1, le=100_000, description="strangers kept at most (oldest go first)")
    stranger_faces: int = Field(5, ge=1, le=32, description="best faces kept per stranger (what promote enrols)")
    stranger_distance_ratio: float = Field(
        0.8, gt=0, le=1,
        description="a track joins a stranger below this x the embedder's threshold (below 1: never merge two)",
    )
    strangers_file: Path | None = Field(
        None, description="keep strangers in this SQLite file (0600) across runs; None = memory only"
    )

    @field_validator("strangers_file")
    @classmethod
    def _expand_strangers_file(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()


class EnrolmentSettings(_Section):
    """What `gallery add`, `gallery import` and FaceEngine.enroll refuse: a poor face in the gallery makes
    every later match of that person worse, so it is refused with the reason rather than enrolled."""

    # Defaults accept every single-face photo of the shared test media (smallest face 54 px, least sharp 166,
    # most turned 27 degrees) and refuse a 3x-downscaled portrait's face or a Gaussian blur of sigma 6+.
    min_face_px: int = Field(40, ge=0, le=8192, description="refuse faces whose shorter box side is below this")
    min_sharpness: float = Field(
        100.0, ge=0, description="refuse faces whose Laplacian variance (64x64 grey crop) is below this"
    )
    max_yaw_deg: float = Field(
        35.0, ge=0, le=90, description="refuse faces turned further than this from frontal (45 = nose over an eye)"
    )


class InferenceSettings(_Section):
    max_batch: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
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


def _is_loopback_host(host: str) -> bool:
    from streamer.sockets import is_loopback

    return is_loopback(f"tcp://[{host}]:1" if ":" in host else f"tcp://{host}:1")


def _check_topic_prefix(value: str) -> str:
    # Published topics may not hold wildcards; a leading "$" is the broker's own ($SYS); empty levels
    # ("a//b", "a/") make topics that subscribers' patterns do not expect.
    if (not value or len(value) > 200 or any(c in value for c in "+#\0") or value.startswith("$")
            or any(not level for level in value.split("/"))):
        raise ValueError("expected topic levels separated by /, without +, #, empty levels or a leading $, e.g. streamer")
    return value


class MqttSettings(_Section):
    """An MQTT broker to publish events, presence and Home Assistant discovery to (off unless `url` is set).

    Fields are declared so that `url`, checked last, sees the credentials and TLS files it depends on.
    """

    username: str | None = Field(None, min_length=1)
    password: SecretStr | None = None  # better from the environment: STREAMER_PUBLISH__MQTT__PASSWORD
    ca_file: Path | None = None  # CA certificate(s) to trust for mqtts://; default: the system's
    cert_file: Path | None = None  # client certificate (PEM) when the broker authenticates by certificate
    key_file: Path | None = None  # its private key, when not inside cert_file
    tls_insecure: bool = False  # skip the host name check of the broker's certificate (not the CA check)
    url: str = Field(description="mqtt://HOST[:PORT] (1883) or mqtts://HOST[:PORT] (8883, TLS)")
    client_id: str | None = Field(None, min_length=1, max_length=128)  # default streamer-HOSTNAME-PID
    topic_prefix: str = "streamer"  # one per streamer instance on a broker: it also names its HA entities
    discovery: bool = True  # Home Assistant MQTT discovery configs (retained)
    discovery_prefix: str = "homeassistant"
    presence_timeout_s: float = Field(300.0, gt=0, le=7 * 86400, description="away after this long unseen")
    queue: int = Field(1000, ge=1, le=1_000_000, description="events kept while the broker is away, then dropped")
    qos: dict[str, Literal[0, 1, 2]] = Field(
        {"identity": 1}, description="QoS per event kind; kinds not named here go out with QoS 0"
    )
    keepalive_s: int = Field(30, ge=5, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _credentials_from_url(cls, data: Any) -> Any:
        # mqtt://user:pass@host is a common way to write it: take the credentials out of the URL, so the URL
        # can be logged and shown in errors. Explicit username/password settings win.
        if not isinstance(data, dict) or not isinstance(data.get("url"), str) or "@" not in data["url"]:
            return data
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(data["url"])
        if parts.username is None:
            return data
        data = dict(data)
        data.setdefault("username", unquote(parts.username))
        if parts.password is not None:
            data.setdefault("password", unquote(parts.password))
        data["url"] = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        return data

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("url")
    @classmethod
    def _url_form(cls, value: str, info: Any) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise ValueError("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] with a port 1-65535") from None
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment or port == 0:
            raise ValueError("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS), e.g. mqtt://127.0.0.1:1883")
        data = info.data
        tls_files = [name for name in ("ca_file", "cert_file", "key_file") if data.get(name) is not None]
        if parts.scheme == "mqtt" and (tls_files or data.get("tls_insecure")):
            raise ValueError(f"publish.mqtt.{(tls_files or ['tls_insecure'])[0]} is set, so use mqtts:// (TLS)")
        if data.get("key_file") is not None and data.get("cert_file") is None:
            raise ValueError("publish.mqtt.key_file needs publish.mqtt.cert_file (the client certificate)")
        if data.get("password") is not None and data.get("username") is None and "username" in data:
            raise ValueError("publish.mqtt.password is set, so publish.mqtt.username must be too")
        authenticated = (data.get("username") is not None and data.get("password") is not None) or \
            data.get("cert_file") is not None
        if not _is_loopback_host(parts.hostname) and not authenticated and {"password", "cert_file"} <= data.keys():
            raise ValueError(
                f"broker {parts.hostname} is beyond this machine, so streamer must log in: set publish.mqtt.username "
                "and publish.mqtt.password (env STREAMER_PUBLISH__MQTT__PASSWORD), or a client certificate with "
                "mqtts:// and publish.mqtt.cert_file"
            )
        return value

    @field_validator("topic_prefix", "discovery_prefix")
    @classmethod
    def _prefix_form(cls, value: str) -> str:
        return _check_topic_prefix(value)

    @field_validator("qos")
    @classmethod
    def _known_kinds(cls, value: dict[str, int]) -> dict[str, int]:
        from streamer.publish.events import KINDS

        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown event kind {unknown[0]!r}; kinds are {', '.join(KINDS)}")
        return value

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        from urllib.parse import urlsplit

        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        from urllib.parse import urlsplit

        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def loopback(self) -> bool:
        return _is_loopback_host(self.host)


class WebhookSettings(_Section):
    """POST matching events as JSON to `url` (off unless listed in publish.webhooks)."""

    url: str = Field(description="http(s)://..., may carry user:password@ for basic auth")
    kinds: list[str] = Field(["identity"], min_length=1, description="event kinds to send")
    names: list[str] = Field(
        [], description="only identity events naming one of these people; empty: every identity (other kinds unaffected)"
    )
    headers: dict[str, SecretStr] = {}  # e.g. {Authorization: "Bearer ..."}; values never logged
    timeout_s: float = Field(5.0, gt=0, le=300)
    retries: int = Field(3, ge=0, le=100, description="attempts after the first on errors and 5xx/429/408")
    queue: int = Field(1000, ge=1, le=1_000_000, description="events waiting for delivery, then dropped")

    @field_validator("url")
    @classmethod
    def _url_form(cls, value: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise ValueError("expected http(s)://HOST[:PORT]/PATH with a port 1-65535") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected http://HOST[:PORT]/PATH or https://..., e.g. http://127.0.0.1:8123/api/webhook/ID")
        return value

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        from streamer.publish.events import KINDS

        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown event kind {unknown[0]!r}; kinds are {', '.join(KINDS)}")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        import re

        for name, secret in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            if any(c in secret.get_secret_value() for c in "\r\n\0"):
                raise ValueError(f"header {name}: the value may not contain line breaks")
        return value


def _check_nats_name(value: str, what: str) -> str:
    # Stream names and subject tokens: no separators or wildcards (".", "*", ">"), no spaces or path
    # characters, no leading "$" (the server's own subjects).
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError(f"expected a {what} of letters, digits, _ and - (1-64 characters)")
    return value


class NatsSettings(_Section):
    """A NATS JetStream cluster to publish events to, durably (off unless `servers` is set).

    Fields are declared so that `servers`, checked last, sees the credentials and TLS files it depends on.
    Credentials: user + password, or token, or an nkey seed file, or a creds file (JWT + nkey); secrets are
    better set from the environment (STREAMER_PUBLISH__NATS__PASSWORD, ...__TOKEN).
    """

    user: str | None = Field(None, min_length=1, max_length=256)
    password: SecretStr | None = None
    token: SecretStr | None = None
    nkey_file: Path | None = None  # an nkey seed file (SU...): needs the `nkeys` package
    creds_file: Path | None = None  # a .creds file (user JWT and nkey seed, from `nsc`): needs `nkeys`
    ca_file: Path | None = None  # CA certificate(s) to trust for tls://; default: the system's
    cert_file: Path | None = None  # client certificate (PEM) when the server authenticates by certificate
    key_file: Path | None = None  # its private key, when not inside cert_file
    servers: list[str] = Field(
        min_length=1, max_length=32, description="nats://HOST[:PORT] (4222) or tls://HOST[:PORT], one per cluster node"
    )
    stream: str = Field("STREAMER", description="the JetStream stream, created or updated at start")
    subject_prefix: str = Field("streamer", description="events go to PREFIX.<kind>.<stream>; the stream takes PREFIX.>")
    replicas: int = Field(1, ge=1, le=5, description="copies of the stream in the cluster (3 survives a node loss)")
    max_age_s: float = Field(7 * 86400.0, gt=0, le=366 * 86400, description="events older than this are removed")
    max_bytes: int = Field(1 << 30, ge=1 << 20, le=1 << 44, description="the stream's size limit; oldest removed")
    duplicate_window_s: float = Field(
        120.0, ge=1, le=86400, description="a resend with the same message id within this window is stored once"
    )
    queue: int = Field(10_000, ge=1, le=1_000_000, description="events kept while the cluster is away, then dropped")
    publish_timeout_s: float = Field(5.0, gt=0, le=300, description="wait this long for JetStream's ack, then resend")
    max_in_flight: int = Field(256, ge=1, le=10_000, description="events published and not yet acknowledged")
    connect_timeout_s: float = Field(2.0, gt=0, le=60)

    @model_validator(mode="before")
    @classmethod
    def _credentials_from_urls(cls, data: Any) -> Any:
        # nats://user:password@host and nats://token@host are how NATS URLs are often written: take the
        # credentials out, so the URLs can be logged and shown in errors. Explicit settings win.
        if not isinstance(data, dict):
            return data
        servers = data.get("servers")
        if isinstance(servers, str):
            servers = [part.strip() for part in servers.split(",") if part.strip()]
        if not isinstance(servers, list) or not any(isinstance(s, str) and "@" in s for s in servers):
            return data
        from urllib.parse import unquote, urlsplit

        data = dict(data)
        cleaned = []
        for server in servers:
            parts = urlsplit(server) if isinstance(server, str) else None
            if parts is None or "@" not in parts.netloc:
                cleaned.append(server)
                continue
            userinfo, _, host = parts.netloc.rpartition("@")
            user, colon, password = userinfo.partition(":")
            if colon:
                data.setdefault("user", unquote(user))
                data.setdefault("password", unquote(password))
            elif user:
                data.setdefault("token", unquote(user))
            cleaned.append(parts._replace(netloc=host).geturl())
        data["servers"] = cleaned
        return data

    @field_validator("nkey_file", "creds_file", "ca_file", "cert_file", "key_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("servers", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # STREAMER_PUBLISH__NATS__SERVERS=nats://a:4222,nats://b:4222 as well as a YAML/JSON list.
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("servers")
    @classmethod
    def _server_form(cls, value: list[str], info: Any) -> list[str]:
        from urllib.parse import urlsplit

        data = info.data
        methods = [name for name in ("token", "nkey_file", "creds_file") if data.get(name) is not None]
        if data.get("user") is not None or data.get("password") is not None:
            if data.get("user") is None or data.get("password") is None:
                raise ValueError("publish.nats.user and publish.nats.password go together")
            methods.insert(0, "user")
        if len(methods) > 1:
            raise ValueError(f"set one way to log in, not {' and '.join('publish.nats.' + m for m in methods)}")
        if data.get("key_file") is not None and data.get("cert_file") is None:
            raise ValueError("publish.nats.key_file needs publish.nats.cert_file (the client certificate)")
        tls_files = [name for name in ("ca_file", "cert_file", "key_file") if data.get(name) is not None]
        authenticated = bool(methods) or data.get("cert_file") is not None
        checked_all = {"password", "token", "nkey_file", "creds_file", "cert_file"} <= data.keys()
        for server in value:
            try:
                parts = urlsplit(server)
                port = parts.port
            except ValueError:
                raise ValueError(f"{server!r}: expected nats://HOST[:PORT] with a port 1-65535") from None
            if parts.username is not None or parts.password is not None:
                raise ValueError(
                    "credentials in a server URL would show in logs: set publish.nats.user and publish.nats.password "
                    "(env STREAMER_PUBLISH__NATS__PASSWORD) or publish.nats.token instead"
                )
            if parts.scheme not in ("nats", "tls") or not parts.hostname or parts.path not in ("", "/") \
                    or parts.query or parts.fragment or port == 0:
                raise ValueError(f"{server!r}: expected nats://HOST[:PORT] or tls://HOST[:PORT], e.g. nats://127.0.0.1:4222")
            if parts.scheme == "nats" and tls_files:
                raise ValueError(f"publish.nats.{tls_files[0]} is set, so use tls://HOST[:PORT]")
            if not _is_loopback_host(parts.hostname) and not authenticated and checked_all:
                raise ValueError(
                    f"server {parts.hostname} is beyond this machine, so streamer must log in: set publish.nats.user "
                    "and publish.nats.password (env STREAMER_PUBLISH__NATS__PASSWORD), publish.nats.token, "
                    "publish.nats.creds_file or a client certificate (tls:// and publish.nats.cert_file)"
                )
        return value

    @field_validator("stream")
    @classmethod
    def _stream_name(cls, value: str) -> str:
        return _check_nats_name(value, "stream name")

    @field_validator("subject_prefix")
    @classmethod
    def _prefix_form(cls, value: str) -> str:
        if len(value) > 200:
            raise ValueError("expected at most 200 characters")
        for token in value.split("."):
            _check_nats_name(token, "subject prefix (tokens separated by .)")
        return value

    @model_validator(mode="after")
    def _window_within_age(self) -> NatsSettings:
        if self.duplicate_window_s > self.max_age_s:
            raise ValueError("publish.nats.duplicate_window_s may not exceed publish.nats.max_age_s")
        return self

    @property
    def loopback(self) -> bool:
        from urllib.parse import urlsplit

        return all(_is_loopback_host(urlsplit(server).hostname or "") for server in self.servers)


class PublishSettings(_Section):
    # A keys folder from `streamer keys generate`, required when `endpoint` listens beyond loopback (declared
    # first: the endpoint check needs it). Its files are read when the socket is made, at start-up.
    keys: Path | None = None
    endpoint: str = "tcp://127.0.0.1:5556"
    # Messages queued per slow subscriber before ZeroMQ drops: each may carry a face crop, so memory.
    sndhwm: int = Field(10_000, ge=1, le=1_000_000)
    heartbeat_s: float = Field(5.0, gt=0, le=3600)
    include_crops: bool = False  # privacy: face crops stay in the process unless turned on
    include_embeddings: bool = False  # privacy: embeddings stay in the process unless turned on
    track_update_s: float = Field(1.0, ge=0, le=3600, description="throttle for track.updated events; 0 = off")
    mqtt: MqttSettings | None = None  # sinks beside ZeroMQ, fed the same events; off unless configured
    webhooks: list[WebhookSettings] = Field([], max_length=32)
    nats: NatsSettings | None = None  # a durable event bus for many hosts (JetStream)

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


class LimitsSettings(_Section):
    # Decoding costs 3 bytes a pixel whatever the file size, and a 629-byte JPEG can declare 20000x20000
    # (2.4 GB): images are refused from their header above this. 40 MP holds any camera photo but the
    # largest; the bound stays under Pillow's own bomb threshold (179 MP), which hides the size beyond it.
    max_image_pixels: int = Field(
        40_000_000, ge=1, le=150_000_000, description="refuse images (not video) with more pixels than this"
    )


class MetricsSettings(_Section):
    """Prometheus metrics for the whole process tree, served by the supervisor; off unless `bind` is set."""

    # Declared first: the bind check needs it. Beyond loopback, scrapers must send `Authorization: Bearer`.
    token: SecretStr | None = None
    bind: str | None = Field(None, description="HOST:PORT to serve /metrics on, e.g. 127.0.0.1:9108")

    @field_validator("bind")
    @classmethod
    def _host_port(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9108")
        import ipaddress

        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and info.data.get("token") is None:
            raise ValueError(
                f"{value} listens beyond loopback: set metrics.token (STREAMER_METRICS__TOKEN) so only your "
                "scraper reads it, or bind 127.0.0.1"
            )
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        assert self.bind is not None
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]"), int(port)


class ServeSettings(_Section):
    """`streamer serve`: the web console and REST API (streamer.serve)."""

    # Declared first: the bind check reads it.
    auth: bool = Field(True, description="require a token for every page and API call")
    bind: str = Field("127.0.0.1:8080", description="HOST:PORT the console and API listen on")
    # Where token hashes live; None = beside the gallery (<gallery>.tokens.json), else the config file's folder.
    token_store: Path | None = None
    max_upload_mb: float = Field(20, gt=0, le=1024, description="largest accepted upload (one file), in MB")
    unknown_ttl_s: float = Field(600, ge=1, le=86_400, description="how long a recent unknown's thumbnail is kept")
    max_unknowns: int = Field(200, ge=1, le=10_000, description="recent unknowns kept in memory at most")
    events_ring: int = Field(5_000, ge=10, le=1_000_000, description="recent events kept for GET /api/v1/events")
    live_fps: float = Field(5, gt=0, le=30, description="most frames a second a live tile is sent")
    live_max_width: int = Field(960, ge=160, le=3840, description="live tiles are downscaled to this width")
    login_attempts_per_minute: int = Field(10, ge=1, le=10_000, description="failed logins allowed per client a minute")
    # HTTPS: both files or neither (PEM; the key unencrypted). Beyond loopback plain HTTP is refused unless
    # allow_plain_http: the token, the session cookie, face thumbnails and names would cross the network in clear.
    tls_cert_file: Path | None = Field(None, description="certificate chain (PEM) to serve HTTPS with")
    tls_key_file: Path | None = Field(None, description="the certificate's private key (PEM, not encrypted)")
    allow_plain_http: bool = Field(False, description="serve plain HTTP beyond loopback (only behind a TLS proxy)")

    @field_validator("token_store")
    @classmethod
    def _expand_store(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _tls_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @model_validator(mode="after")
    def _tls_beyond_loopback(self) -> ServeSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            # ConfigError, not ValueError: pydantic would append the whole section to the sentence.
            raise ConfigError("serve.tls_cert_file and serve.tls_key_file go together: set both (HTTPS) or neither")
        if self.tls_cert_file is None and not self.allow_plain_http and not _is_loopback_host(self.host_port[0]):
            raise ConfigError(
                f"serve.bind {self.bind} listens beyond loopback without TLS, so tokens and faces would cross the "
                "network in clear: set serve.tls_cert_file and serve.tls_key_file, or serve.allow_plain_http: true "
                "if a TLS proxy sits in front"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str, info: Any) -> str:
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8080")
        if info.data.get("auth") is False and not _is_loopback_host(host):
            raise ValueError(
                f"{value} listens beyond loopback, so serve.auth cannot be false: anyone on the network would "
                "see faces and names; keep serve.auth on (the default) or bind 127.0.0.1"
            )
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]"), int(port)


MAX_DETECT_WORKERS = 64


class PipelineSettings(_Section):
    """How the pipeline spreads its streams over processes on this host."""

    # One process decodes and detects a shard of the streams; each shares the inference worker(s), so
    # batches still fill across all streams. "auto": one per core but one (left for the inference worker
    # and the supervisor), never more than there are streams.
    detect_workers: Literal["auto"] | int = Field(
        "auto", description="detect-worker processes: auto (follow the cores) or a number from 1 to 64"
    )

    @field_validator("detect_workers", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> Any:
        # Checked here, once: the union's own errors would name both of its branches.
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= MAX_DETECT_WORKERS:
            raise ValueError(f"expected auto or a number from 1 to {MAX_DETECT_WORKERS}")
        return int(text)


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
    # Each source is a decoder thread and its buffers; more than this is a mistake, not a site.
    sources: list[SourceSettings] = Field([], max_length=256)
    reconnect: ReconnectSettings = ReconnectSettings()
    tracker: TrackerSettings = TrackerSettings()
    recognition: RecognitionSettings = RecognitionSettings()
    enrolment: EnrolmentSettings = EnrolmentSettings()
    inference: InferenceSettings = InferenceSettings()
    publish: PublishSettings = PublishSettings()
    output: OutputSettings = OutputSettings()
    limits: LimitsSettings = LimitsSettings()
    metrics: MetricsSettings = MetricsSettings()
    serve: ServeSettings = ServeSettings()
    pipeline: PipelineSettings = PipelineSettings()

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

MAX_CONFIG_BYTES = 1 << 20  # a settings file for hundreds of cameras is tens of kB
MAX_YAML_DEPTH = 32  # the settings tree is 4 levels deep; pure-Python composing recurses per level
ECHO_CHARS = 200  # how much of a bad value an error message repeats
MAX_PROBLEMS = 5  # errors listed in one message; the rest are counted


class _SettingsLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases, and with a depth limit.

    An alias is a reference: nine levels of nine references ("billion laughs") are 400 bytes of YAML that
    validation and error messages expand to hundreds of MB. Settings files have no need for them, so the
    first anchor or alias is refused, before anything is built.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(
                problem="anchors and aliases (&name, *name, <<: *name) are not allowed in a settings file: "
                "write the values out",
                problem_mark=event.start_mark,
            )
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_YAML_DEPTH:
            raise yaml.MarkedYAMLError(
                problem=f"nested more than {MAX_YAML_DEPTH} levels deep", problem_mark=event.start_mark
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line from PyYAML's multi-line message (which quotes the offending line under a caret)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        words = ": ".join(str(part) for part in (exc.context, exc.problem) if part)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{_shorten(words)}{where}"
    return _shorten(" ".join(str(exc).split()))


def _shorten(text: str, limit: int = ECHO_CHARS) -> str:
    return text if len(text) <= limit else f"{text[: limit - 25]}... ({len(text)} characters)"


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
            with self.path.open("rb") as file:  # read with a bound: the path may be a device or a pipe
                raw = file.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"config file {self.path}: {exc.strerror}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {self.path} is over {MAX_CONFIG_BYTES >> 20} MiB: is it the right file? "
                "(settings files are a few kB)"
            )
        try:
            # Bytes, not text: PyYAML then reads UTF-8 or, with a byte-order mark, UTF-16 (what Windows
            # PowerShell's `>` writes), and says where a byte is not UTF-8.
            data = yaml.load(raw, Loader=_SettingsLoader) or {}
        except yaml.reader.ReaderError as exc:
            if exc.encoding != "unicode":  # PyYAML's marker for a decoded but unprintable character
                line = raw[: exc.position].count(b"\n") + 1
                raise ConfigError(
                    f"config file {self.path} is not UTF-8 text (byte 0x{exc.character:02x} on line {line}, "
                    f"offset {exc.position}): save it as UTF-8 (most editors: Save with Encoding)"
                ) from None
            raise ConfigError(
                f"config file {self.path} is not valid YAML: character #x{exc.character:04x} at character "
                f"{exc.position}: {exc.reason} (remove it)"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {self.path} is not valid YAML: {_yaml_problem(exc)}") from None
        except ValueError as exc:  # an integer of more than 4300 digits: Python's guard against slow parsing
            reason = _shorten(str(exc).split(";")[0])
            raise ConfigError(f"config file {self.path} holds a value that cannot be read: {reason}") from None
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
    except SettingsError as exc:
        raise ConfigError(_describe_env_error(exc)) from None
    finally:
        _YAML_FILE.pop("path", None)


_ECHO = reprlib.Repr()  # keyword arguments only from Python 3.12
_ECHO.maxstring = _ECHO.maxother = ECHO_CHARS
_ECHO.maxlist = _ECHO.maxdict = 6
_ECHO.maxlevel = 3


def _redact(value: Any) -> Any:
    """An error's input without secrets: a section's dict echoed back may hold a password or headers."""
    if isinstance(value, dict):
        return {k: "**********" if k in ("password", "headers") else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _describe(exc: ValidationError) -> str:
    problems = []
    errors = exc.errors(include_url=False)
    for error in errors[:MAX_PROBLEMS]:
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        env = "STREAMER_" + "__".join(str(p).upper() for p in error["loc"] if not isinstance(p, int))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        # reprlib bounds the work, not only the text: a value may be a long list or a long string.
        got = _shorten(_ECHO.repr(_redact(error.get("input"))))
        problems.append(f"setting {where} ({env}): {_shorten(' '.join(message.split()), 300)} (got {got})")
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(problems)


_JSON_EXAMPLES = {
    ("sources",): '[{"url": "rtsp://camera/stream1", "id": "entrance"}]',
    ("models", "paths"): '{"yunet": "/opt/models/yunet.onnx"}',
}


def _json_example(keys: tuple[str, ...]) -> str | None:
    """An example value for the env var STREAMER_<KEYS> when pydantic-settings decodes it as JSON (a list,
    a mapping or a whole section); None for plain values, unknown names and NoDecode fields."""
    model: Any = Settings
    field = None
    for key in keys:
        fields = getattr(model, "model_fields", {})
        if key not in fields:
            return None  # an unknown name or a key inside a mapping: validation says what is wrong there
        field = fields[key]
        members = (field.annotation, *get_args(field.annotation))
        model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
    if field is None or NoDecode in field.metadata:
        return None
    if keys in _JSON_EXAMPLES:
        return _JSON_EXAMPLES[keys]
    if get_origin(field.annotation) is dict:
        return '{"key": "value"}'
    if get_origin(field.annotation) is list:
        items = [m for m in get_args(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
        return f"[{_section_example(items[0])}]" if items else '["a","b"]'
    return None if model is None else _section_example(model)


def _section_example(model: type[BaseModel]) -> str:
    """`{"first required field": "..."}`, or the first field and its default when none is required."""
    fields = model.model_fields.items()
    name, info = next(((n, f) for n, f in fields if f.is_required()), next(iter(fields)))
    return json.dumps({name: "..." if info.is_required() else info.default}, default=str)


def _describe_env_error(exc: SettingsError) -> str:
    """pydantic-settings names only the top-level field when an env var is not the JSON it expects: find
    the variable and show the form it takes. The value is not echoed: camera URLs and sinks carry passwords."""
    prefix = "STREAMER_"
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(prefix):
            continue
        example = _json_example(tuple(name[len(prefix) :].lower().split("__")))
        if example is None:
            continue
        try:
            json.loads(value)
        except ValueError:
            return f"environment variable {name} is not JSON, which this setting takes: e.g. {name}='{example}'"
    return f"environment settings: {_shorten(' '.join(str(exc).split()), 300)}"
