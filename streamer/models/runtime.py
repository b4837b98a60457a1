"""The one place that creates onnxruntime sessions.

Providers are resolved once: CUDA only when it really loads (checked with `get_providers()` after the
session is built, because onnxruntime-gpu silently falls back to CPU without CUDA libraries), else CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from streamer.errors import ModelError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]


def cores() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RuntimeOptions:
    device: Device = "auto"
    intra_op_threads: int = 0  # 0 lets onnxruntime pick (all cores)
    # onnxruntime's worker threads busy-wait between runs by default; on a small CPU that steals the cores
    # that decoding and detection need, for a few percent of inference speed.
    allow_spinning: bool = False


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - install problem
        raise ModelError(
            "onnxruntime is not installed: pip install 'streamer[cpu]' (or 'streamer[gpu]')"
        ) from exc
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def available_devices() -> list[str]:
    providers = _ort().get_available_providers()
    return (["cuda"] if "CUDAExecutionProvider" in providers else []) + ["cpu"]


class OnnxModel:
    """An onnxruntime session plus what is needed to run it on batches of any size.

    `max_batch` splits huge batches so memory stays bounded; models exported with a fixed batch
    of 1 are run row by row (detected from the input shape).
    """

    def __init__(
        self,
        path: str | Path,
        options: RuntimeOptions = RuntimeOptions(),
        *,
        name: str | None = None,
        max_batch: int = 64,
    ) -> None:
        ort = _ort()
        self.path = Path(path)
        self.name = name or self.path.stem
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        if options.intra_op_threads:
            session_options.intra_op_num_threads = options.intra_op_threads
        if not options.allow_spinning:
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        wanted = ["CPUExecutionProvider"]
        if options.device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=session_options, providers=wanted
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ModelError(f"cannot load model {self.name} from {self.path}: corrupt or not ONNX ({exc.__class__.__name__})") from exc
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if options.device == "cuda" and self.device != "cuda":
            raise ModelError(
                f"device=cuda was asked for but CUDA did not load for {self.name} "
                f"(providers: {self.providers}); install onnxruntime-gpu with a matching CUDA"
            )
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape)
        self.output_names = [o.name for o in self.session.get_outputs()]
        fixed_batch = self.input_shape and isinstance(self.input_shape[0], int)
        self.max_batch = 1 if fixed_batch and self.input_shape[0] == 1 else max_batch
        log.debug("loaded %s on %s", self.name, self.providers)

    def check_input(self, sample_shape: Sequence[int]) -> None:
        """Fail loudly when the declared preprocessing does not match the file (wrong model file)."""
        declared = self.input_shape[1:]
        for got, want in zip(sample_shape, declared):
            if isinstance(want, int) and got != want:
                raise ModelError(
                    f"model {self.name} ({self.path}) expects input {self.input_shape}, "
                    f"but its spec prepares {tuple(sample_shape)}: wrong model file?"
                )

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run every output on a batch of any size (0 included); outputs concatenated along axis 0."""
        if len(batch) == 0:
            return [np.zeros((0,), np.float32) for _ in self.output_names]
        parts = [
            self.session.run(self.output_names, {self.input_name: batch[i : i + self.max_batch]})
            for i in range(0, len(batch), self.max_batch)
        ]
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(self.output_names))]
