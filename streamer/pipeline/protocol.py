"""The detect <-> inference worker protocol: frozen messages that check everything a peer sends.

Every message is a ZeroMQ multipart message: one JSON header, then one raw buffer per array (no pickle,
zero-copy on send), so a worker on another host, or in another language, can speak it:

    frame 0   {"protocol": "streamer.infer/1", "type": "...", ..., "arrays": [{"name", "dtype", "shape"}]}
    frame 1.. the arrays' bytes, C order, in the order the header lists them

    hello    client -> worker  the client's embedder id and model hash, the heads it will send
    welcome  worker -> client  the worker's embedder id, model hash, chip size, heads, max batch, device
    request  client -> worker  `id`, `embedder`, `n` faces: chips (n,S,S,3) uint8 + one crop array per head
    result   worker -> client  `id`, `embedder`, `sha256`, `n`: embedding (n,D) float32 + per-head values
    error    either way        `id` (or null) and one sentence

A request carries nothing but the pixels: which stream, frame and tracks it is about stays with the
client that sent it, so no reply can ever tell a client about faces it did not send.

`from_frames` checks frame count, header schema, array names, a dtype whitelist, shapes against buffer
sizes, the chip size against the embedder's and the face count against `inference.max_batch`; anything
else raises `ProtocolError` (a ValueError) with one line. The sockets also cap the size of a whole
message (ZMQ_MAXMSGSIZE), so a hostile peer cannot make us buffer gigabytes first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import numpy as np
import orjson
import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL = "streamer.infer/1"
MAX_HEADER_BYTES = 64 * 1024
ATTRIBUTE_CROP = 64  # every attribute head takes 64x64 crops
EMOTION_CLASSES = 7

# name -> (dtype, sample shape without the face axis); None in a shape is checked by the caller's limits.
REQUEST_ARRAYS: Mapping[str, tuple[np.dtype, tuple[int | None, ...]]] = MappingProxyType({
    "chips": (np.dtype(np.uint8), (None, None, 3)),
    "age": (np.dtype(np.float32), (ATTRIBUTE_CROP, ATTRIBUTE_CROP, 3)),
    "gender": (np.dtype(np.float32), (ATTRIBUTE_CROP, ATTRIBUTE_CROP, 1)),
    "emotion": (np.dtype(np.float32), (ATTRIBUTE_CROP, ATTRIBUTE_CROP, 1)),
})
RESULT_ARRAYS: Mapping[str, tuple[np.dtype, tuple[int | None, ...]]] = MappingProxyType({
    "embedding": (np.dtype(np.float32), (None,)),
    "age": (np.dtype(np.float32), ()),
    "gender": (np.dtype(np.float32), ()),
    "emotion": (np.dtype(np.float32), (EMOTION_CLASSES,)),
})
HEADS = ("age", "gender", "emotion")


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text is one line, safe to log and to send back."""


# -- headers (validated with pydantic: types, ranges, no unknown keys) -------------------------------------
class _Header(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    protocol: Literal["streamer.infer/1"]


class _ArraySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(max_length=32)
    dtype: str = Field(max_length=8)
    shape: tuple[int, ...] = Field(max_length=8)


class _WithArrays(_Header):
    arrays: tuple[_ArraySpec, ...] = Field(max_length=8)


class _HelloHeader(_Header):
    type: Literal["hello"]
    embedder: str = Field(min_length=1, max_length=200)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    heads: tuple[Literal["age", "gender", "emotion"], ...] = Field(max_length=3)


class _WelcomeHeader(_HelloHeader):
    type: Literal["welcome"]  # type: ignore[assignment]
    chip_size: int = Field(ge=16, le=1024)
    max_batch: int = Field(ge=1, le=1 << 16)
    device: str = Field(max_length=16)


class _RequestHeader(_WithArrays):
    type: Literal["request"]
    id: int = Field(ge=1, lt=1 << 62)
    embedder: str = Field(min_length=1, max_length=200)
    n: int = Field(ge=1, le=1 << 16)


class _ResultHeader(_WithArrays):
    type: Literal["result"]
    id: int = Field(ge=1, lt=1 << 62)
    embedder: str = Field(min_length=1, max_length=200)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    n: int = Field(ge=1, le=1 << 16)
    batch: int = Field(ge=1)
    infer_ms: float = Field(ge=0)
    queued_ms: float = Field(ge=0)
    device: str = Field(max_length=16)


class _ErrorHeader(_Header):
    type: Literal["error"]
    id: int | None = Field(None, ge=1, lt=1 << 62)
    error: str = Field(max_length=500)


_HEADERS: dict[str, type[_Header]] = {
    "hello": _HelloHeader,
    "welcome": _WelcomeHeader,
    "request": _RequestHeader,
    "result": _ResultHeader,
    "error": _ErrorHeader,
}


# -- messages ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    embedder: str
    sha256: str
    heads: tuple[str, ...]
    type: ClassVar[str] = "hello"

    def to_frames(self) -> list[Any]:
        return [_dump({"type": self.type, "embedder": self.embedder, "sha256": self.sha256, "heads": list(self.heads)})]


@dataclass(frozen=True)
class Welcome:
    embedder: str
    sha256: str
    heads: tuple[str, ...]
    chip_size: int
    max_batch: int
    device: str
    type: ClassVar[str] = "welcome"

    def to_frames(self) -> list[Any]:
        return [_dump({
            "type": self.type, "embedder": self.embedder, "sha256": self.sha256, "heads": list(self.heads),
            "chip_size": self.chip_size, "max_batch": self.max_batch, "device": self.device,
        })]

    def mismatch(self, embedder: str, sha256: str, chip_size: int, heads: Sequence[str]) -> str | None:
        """Why a client with these models cannot use this worker, or None when it can."""
        if embedder != self.embedder or sha256 != self.sha256:
            return (
                f"the inference worker runs embedder {self.embedder} (sha256 {self.sha256[:12]}), this host "
                f"{embedder} (sha256 {sha256[:12]}): their vectors are not comparable; run both with the same "
                "embedder.name and model file"
            )
        if chip_size != self.chip_size:
            return f"the inference worker expects {self.chip_size}px chips, this host makes {chip_size}px ones"
        missing = sorted(set(heads) - set(self.heads))
        if missing:
            return (
                f"the inference worker does not run the attribute heads {', '.join(missing)}: "
                "set the same attributes.enabled on both"
            )
        return None


@dataclass(frozen=True, eq=False)
class InferenceRequest:
    id: int
    embedder: str
    arrays: Mapping[str, np.ndarray]  # "chips" and one crop array per head, n rows each
    type: ClassVar[str] = "request"

    @property
    def n(self) -> int:
        return len(self.arrays["chips"])

    def to_frames(self) -> list[Any]:
        return _with_arrays({"type": self.type, "id": self.id, "embedder": self.embedder, "n": self.n}, self.arrays)


@dataclass(frozen=True, eq=False)
class InferenceResult:
    id: int
    embedder: str
    sha256: str
    arrays: Mapping[str, np.ndarray]  # "embedding" (n, D) and one value array per head
    batch: int  # faces in the batch this request ran in
    infer_ms: float
    queued_ms: float
    device: str
    type: ClassVar[str] = "result"

    @property
    def n(self) -> int:
        return len(self.arrays["embedding"])

    def to_frames(self) -> list[Any]:
        header = {
            "type": self.type, "id": self.id, "embedder": self.embedder, "sha256": self.sha256, "n": self.n,
            "batch": self.batch, "infer_ms": round(self.infer_ms, 3), "queued_ms": round(self.queued_ms, 3),
            "device": self.device,
        }
        return _with_arrays(header, self.arrays)


@dataclass(frozen=True)
class ErrorReply:
    error: str
    id: int | None = None
    type: ClassVar[str] = "error"

    def to_frames(self) -> list[Any]:
        return [_dump({"type": self.type, "id": self.id, "error": self.error[:500]})]


Message = Hello | Welcome | InferenceRequest | InferenceResult | ErrorReply


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts beyond the schema: the worker's chip size, heads and batch cap; a client's
    embedding length."""

    chip_size: int | None = None
    heads: frozenset[str] = frozenset(HEADS)
    max_faces: int = 1024
    embedding_dim: int | None = None
    accept: frozenset[str] = field(default_factory=lambda: frozenset(_HEADERS))


def from_frames(frames: Sequence[Any], limits: Limits = Limits()) -> Message:
    """Decode and check one message; raises ProtocolError saying what is wrong."""
    if not frames:
        raise ProtocolError("empty message")
    raw = _bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes, at most {MAX_HEADER_BYTES}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError("header is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("header is not a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in _HEADERS or kind not in limits.accept:  # a list is unhashable
        raise ProtocolError(f"unexpected message type {str(kind)[:40]!r}")
    try:
        header = _HEADERS[kind].model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        where = "".join(c if c.isprintable() else "?" for c in where[:64])  # a key the peer chose: one short line
        raise ProtocolError(f"{kind} header: {where}: {first['msg']}") from None
    if isinstance(header, _HelloHeader) and not isinstance(header, _WelcomeHeader):
        _no_buffers(frames, kind)
        return Hello(header.embedder, header.sha256, tuple(header.heads))
    if isinstance(header, _WelcomeHeader):
        _no_buffers(frames, kind)
        return Welcome(header.embedder, header.sha256, tuple(header.heads), header.chip_size, header.max_batch,
                       header.device)
    if isinstance(header, _ErrorHeader):
        _no_buffers(frames, kind)
        return ErrorReply(header.error, header.id)
    if isinstance(header, _RequestHeader):
        if header.n > limits.max_faces:
            raise ProtocolError(f"request {header.id}: {header.n} faces, at most {limits.max_faces} (inference.max_batch)")
        arrays = _arrays(frames, header, REQUEST_ARRAYS, limits)
        if "chips" not in arrays:
            raise ProtocolError(f"request {header.id}: no chips")
        unserved = sorted(set(arrays) - {"chips"} - limits.heads)
        if unserved:
            raise ProtocolError(f"request {header.id}: this worker does not run {', '.join(unserved)}")
        return InferenceRequest(header.id, header.embedder, arrays)
    assert isinstance(header, _ResultHeader)
    arrays = _arrays(frames, header, RESULT_ARRAYS, limits)
    if "embedding" not in arrays:
        raise ProtocolError(f"result {header.id}: no embedding")
    return InferenceResult(header.id, header.embedder, header.sha256, arrays, header.batch, header.infer_ms,
                           header.queued_ms, header.device)


# -- internals -------------------------------------------------------------------------------------------
def _dump(header: dict[str, Any]) -> bytes:
    return orjson.dumps({"protocol": PROTOCOL, **header})


def _with_arrays(header: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> list[Any]:
    contiguous = [np.ascontiguousarray(a) for a in arrays.values()]
    layout = [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape)} for n, a in zip(arrays, contiguous)]
    return [_dump({**header, "arrays": layout}), *contiguous]


def _bytes(frame: Any) -> bytes | memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return frame


def _no_buffers(frames: Sequence[Any], kind: str) -> None:
    if len(frames) != 1:
        raise ProtocolError(f"{kind}: expected 1 frame, got {len(frames)}")


def _arrays(
    frames: Sequence[Any],
    header: _RequestHeader | _ResultHeader,
    allowed: Mapping[str, tuple[np.dtype, tuple[int | None, ...]]],
    limits: Limits,
) -> dict[str, np.ndarray]:
    what = f"{header.type} {header.id}"
    if len(frames) - 1 != len(header.arrays):
        raise ProtocolError(f"{what}: header lists {len(header.arrays)} arrays, message carries {len(frames) - 1}")
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(header.arrays, frames[1:]):
        if spec.name not in allowed:
            raise ProtocolError(f"{what}: unknown array {spec.name[:32]!r}")
        if spec.name in arrays:
            raise ProtocolError(f"{what}: array {spec.name!r} twice")
        dtype, sample = allowed[spec.name]
        if spec.dtype != dtype.str:
            raise ProtocolError(f"{what}: {spec.name} must be {dtype.str}, got {spec.dtype[:8]!r}")
        want = [header.n, *sample]
        if spec.name == "chips" and limits.chip_size is not None:
            want[1] = want[2] = limits.chip_size
        if spec.name == "embedding" and limits.embedding_dim is not None:
            want[1] = limits.embedding_dim
        if len(spec.shape) != len(want) or any(w is not None and g != w for g, w in zip(spec.shape, want)):
            shown = tuple("*" if w is None else w for w in want)
            raise ProtocolError(f"{what}: {spec.name} must have shape {shown}, got {spec.shape}")
        if any(d < 1 for d in spec.shape):
            raise ProtocolError(f"{what}: {spec.name} has an empty axis {spec.shape}")
        buffer = _bytes(frame)
        expected = math.prod(spec.shape) * dtype.itemsize
        if memoryview(buffer).nbytes != expected:
            raise ProtocolError(
                f"{what}: {spec.name} {spec.shape} needs {expected} bytes, the buffer has {memoryview(buffer).nbytes}"
            )
        array = np.frombuffer(buffer, dtype=dtype).reshape(spec.shape)
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise ProtocolError(f"{what}: {spec.name} holds NaN or infinite values")
        arrays[spec.name] = array
    return arrays
