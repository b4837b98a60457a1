"""How the workers talk: ZeroMQ multipart messages of one JSON header plus raw array buffers.

No pickle: a header names each array's dtype and shape, the buffers travel as-is (zero-copy on send),
so a worker in another language or on another host (a GPU box serving many camera hosts over tcp://)
can speak it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import zmq


@dataclass(frozen=True)
class Message:
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> list[Any]:
    arrays = arrays or {}
    layout = [
        {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)} for name, array in arrays.items()
    ]
    frames: list[Any] = [orjson.dumps({**header, "_arrays": layout})]
    frames.extend(np.ascontiguousarray(array) for array in arrays.values())
    return frames


def decode(frames: list[Any]) -> Message:
    header = orjson.loads(bytes(frames[0]))
    layout = header.pop("_arrays", [])
    if len(layout) != len(frames) - 1:
        raise ValueError(f"message declares {len(layout)} arrays but carries {len(frames) - 1} buffers")
    arrays = {}
    for spec, frame in zip(layout, frames[1:]):
        buffer = frame.buffer if isinstance(frame, zmq.Frame) else frame
        arrays[spec["name"]] = np.frombuffer(buffer, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
    return Message(header, arrays)


class SocketDefaults:
    """High-water marks and timeouts in one place (messages, milliseconds)."""

    LINGER_MS = 0  # never hang at exit on undelivered messages
    REQUEST_HWM = 64  # inference requests in flight per detect worker (each holds up to a batch of chips)
    RESULT_HWM = 256
    EVENT_HWM = 10_000  # detect worker -> supervisor events
    CONTROL_POLL_MS = 50


def make_socket(context: zmq.Context, kind: int, *, hwm: int, bind: str | None = None, connect: str | None = None) -> zmq.Socket:
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, SocketDefaults.LINGER_MS)
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    if bind:
        socket.bind(bind)
    if connect:
        socket.connect(connect)
    return socket
