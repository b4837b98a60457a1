"""The worker protocol without models: every message round-trips, every malformed one is a ProtocolError.

`hostile_requests` is also what test_inference_worker.py throws at a real worker, so one table says
both what `from_frames` refuses and what a worker answers with an error instead of crashing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
import zmq

from streamer.pipeline.protocol import (
    ATTRIBUTE_CROP,
    EMOTION_CLASSES,
    MAX_HEADER_BYTES,
    PROTOCOL,
    ErrorReply,
    Hello,
    InferenceRequest,
    InferenceResult,
    Limits,
    ProtocolError,
    Welcome,
    from_frames,
)

SHA = "ab" * 32
OTHER_SHA = "cd" * 32
S = 16  # chip size the test worker limits expect
DIM = 4  # embedding length the test client limits expect
WORKER_HEADS = ("age", "gender")  # emotion is a head this worker does not run
WORKER = Limits(chip_size=S, heads=frozenset(WORKER_HEADS), max_faces=8, accept=frozenset({"hello", "request"}))
CLIENT = Limits(embedding_dim=DIM, accept=frozenset({"welcome", "result", "error"}))


# -- builders ----------------------------------------------------------------------------------------------
def request_arrays(n: int, chip: int = S, heads=WORKER_HEADS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"chips": rng.integers(0, 256, (n, chip, chip, 3), dtype=np.uint8)}
    channels = {"age": 3, "gender": 1, "emotion": 1}
    for head in heads:
        arrays[head] = rng.random((n, ATTRIBUTE_CROP, ATTRIBUTE_CROP, channels[head]), dtype=np.float32)
    return arrays


def result_arrays(n: int, dim: int = DIM, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embedding": rng.standard_normal((n, dim)).astype(np.float32),
        "age": rng.uniform(1, 90, n).astype(np.float32),
        "gender": rng.random(n, dtype=np.float32),
        "emotion": rng.random((n, EMOTION_CLASSES), dtype=np.float32),
    }


def valid_request(n: int = 2, chip: int = S, heads=WORKER_HEADS, embedder: str = "emb") -> list[Any]:
    return InferenceRequest(7, embedder, request_arrays(n, chip, heads)).to_frames()


def valid_result(n: int = 2, dim: int = DIM) -> list[Any]:
    return InferenceResult(7, "emb", SHA, result_arrays(n, dim), batch=n, infer_ms=1.5, queued_ms=0.25,
                           device="cpu").to_frames()


def split(frames: list[Any]) -> tuple[dict[str, Any], list[bytes]]:
    """(header dict, buffers as bytes) of a message, ready to tamper with."""
    return orjson.loads(frames[0]), [bytes(memoryview(np.ascontiguousarray(b)).cast("B")) for b in frames[1:]]


def join(header: dict[str, Any], buffers: list[bytes]) -> list[bytes]:
    return [orjson.dumps(header), *buffers]


def tampered(frames: list[Any], change: Callable[[dict[str, Any], list[bytes]], None]) -> list[bytes]:
    header, buffers = split(frames)
    change(header, buffers)
    return join(header, buffers)


def spec(header: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in header["arrays"] if a["name"] == name)


def position(header: dict[str, Any], name: str) -> int:
    return [a["name"] for a in header["arrays"]].index(name)


def _set(key: str, value: Any) -> Callable[[dict[str, Any], list[bytes]], None]:
    def change(header: dict[str, Any], _buffers: list[bytes]) -> None:
        header[key] = value
    return change


def _drop(key: str) -> Callable[[dict[str, Any], list[bytes]], None]:
    def change(header: dict[str, Any], _buffers: list[bytes]) -> None:
        del header[key]
    return change


def _resize_buffer(name: str, delta: int) -> Callable[[dict[str, Any], list[bytes]], None]:
    def change(header: dict[str, Any], buffers: list[bytes]) -> None:
        i = position(header, name)
        buffers[i] = buffers[i][:delta] if delta < 0 else buffers[i] + b"\0" * delta
    return change


def _nan_in(name: str, value: float) -> Callable[[dict[str, Any], list[bytes]], None]:
    def change(header: dict[str, Any], buffers: list[bytes]) -> None:
        i = position(header, name)
        array = np.frombuffer(buffers[i], np.float32).copy()
        array[len(array) // 2] = value
        buffers[i] = array.tobytes()
    return change


def _lie_about_n(header: dict[str, Any], buffers: list[bytes]) -> None:
    """Declare one face more than the buffers carry, shapes included (a peer trying to read past its data)."""
    header["n"] += 1
    for a in header["arrays"]:
        a["shape"][0] += 1


def _one_more_buffer(header: dict[str, Any], buffers: list[bytes]) -> None:
    buffers.append(buffers[0])


def _one_buffer_less(header: dict[str, Any], buffers: list[bytes]) -> None:
    buffers.pop()


def _rename(old: str, new: str) -> Callable[[dict[str, Any], list[bytes]], None]:
    def change(header: dict[str, Any], _buffers: list[bytes]) -> None:
        spec(header, old)["name"] = new
    return change


def _chips_twice(header: dict[str, Any], buffers: list[bytes]) -> None:
    header["arrays"].append(dict(spec(header, "chips")))
    buffers.append(buffers[position(header, "chips")])


def _chips_as(dtype: str) -> Callable[[dict[str, Any], list[bytes]], None]:
    def change(header: dict[str, Any], buffers: list[bytes]) -> None:
        spec(header, "chips")["dtype"] = dtype
        i = position(header, "chips")
        buffers[i] = np.frombuffer(buffers[i], np.uint8).astype(np.float64).tobytes()  # 8 bytes per value
    return change


def _chip_shape(shape: Callable[[list[int]], list[int]]) -> Callable[[dict[str, Any], list[bytes]], None]:
    def change(header: dict[str, Any], buffers: list[bytes]) -> None:
        chips = spec(header, "chips")
        chips["shape"] = shape(chips["shape"])
        i = position(header, "chips")
        buffers[i] = b"\0" * int(np.prod(chips["shape"]))  # the buffer matches the (wrong) shape
    return change


def _only_heads(header: dict[str, Any], buffers: list[bytes]) -> None:
    i = position(header, "chips")
    del header["arrays"][i]
    del buffers[i]


def hostile_requests(chip: int = S, max_faces: int = 8) -> list[tuple[str, list[bytes], str]]:
    """(case, frames, fragment of the error) for messages a worker with these limits (and heads age,
    gender) must refuse. Every case has at least one frame, so it can be sent over ZeroMQ."""
    request = valid_request(2, chip)
    chip_bytes = 2 * chip * chip * 3
    hello = Hello("emb", SHA, ("age",)).to_frames()
    welcome = Welcome("emb", SHA, ("age",), chip, 32, "cpu").to_frames()
    padded = orjson.dumps({"protocol": PROTOCOL, "type": "hello", "pad": " " * MAX_HEADER_BYTES})
    return [
        ("empty frame", [b""], "header is not JSON"),
        ("not JSON", [b"{nope"], "header is not JSON"),
        ("not UTF-8", [b"\xff\xfe{}"], "header is not JSON"),
        ("JSON list", [b"[1, 2]"], "header is not a JSON object"),
        ("JSON string", [b'"request"'], "header is not a JSON object"),
        ("too large header", [padded], f"header of {len(padded)} bytes, at most {MAX_HEADER_BYTES}"),
        ("unknown type", tampered(request, _set("type", "launch")), "unexpected message type 'launch'"),
        ("no type", tampered(request, _drop("type")), "unexpected message type 'None'"),
        ("type is a list", tampered(request, _set("type", ["request"])), "unexpected message type"),
        ("type is an object", tampered(request, _set("type", {"a": 1})), "unexpected message type"),
        ("type not accepted here", welcome, "unexpected message type 'welcome'"),
        ("result sent to a worker", valid_result(), "unexpected message type 'result'"),
        ("missing key", tampered(request, _drop("embedder")), "request header: embedder: Field required"),
        ("missing id", tampered(request, _drop("id")), "request header: id: Field required"),
        ("extra key", tampered(request, _set("stream", "cam0")), "request header: stream: Extra inputs"),
        ("extra key with a newline", tampered(request, _set("a\nb" * 100, 1)), "Extra inputs are not permitted"),
        ("wrong protocol", tampered(request, _set("protocol", "streamer.infer/2")),
         "request header: protocol: Input should be 'streamer.infer/1'"),
        ("no protocol", tampered(request, _drop("protocol")), "request header: protocol: Field required"),
        ("id zero", tampered(request, _set("id", 0)), "request header: id: Input should be greater than"),
        ("embedder empty", tampered(request, _set("embedder", "")), "request header: embedder: String should have"),
        ("n zero", tampered(request, _set("n", 0)), "request header: n: Input should be greater than or equal to 1"),
        ("n not a number", tampered(request, _set("n", "two")), "request header: n: Input should be a valid integer"),
        ("huge n", tampered(request, _set("n", 1 << 40)), "request header: n: Input should be less than or equal to"),
        ("n over max_faces", tampered(request, _set("n", max_faces + 1)), f"{max_faces + 1} faces, at most {max_faces}"),
        ("arrays not a list", tampered(request, _set("arrays", "chips")), "request header: arrays"),
        ("more arrays than buffers", tampered(request, _one_buffer_less), "header lists 3 arrays, message carries 2"),
        ("fewer arrays than buffers", tampered(request, _one_more_buffer), "header lists 3 arrays, message carries 4"),
        ("unknown array", tampered(request, _rename("age", "ages")), "unknown array 'ages'"),
        ("result array in a request", tampered(request, _rename("age", "embedding")), "unknown array 'embedding'"),
        ("duplicate array", tampered(request, _chips_twice), "array 'chips' twice"),
        ("float64 chips", tampered(request, _chips_as("<f8")), "chips must be |u1, got '<f8'"),
        ("object chips", tampered(request, _chips_as("|O")), "chips must be |u1, got '|O'"),
        ("big-endian crops", tampered(request, lambda h, b: spec(h, "age").update(dtype=">f4")),
         "age must be <f4, got '>f4'"),
        ("chips rank 3", tampered(request, _chip_shape(lambda s: s[:3])),
         f"chips must have shape (2, {chip}, {chip}, 3), got (2, {chip}, {chip})"),
        ("chips rank 5", tampered(request, _chip_shape(lambda s: [*s, 1])), "chips must have shape"),
        ("shape[0] != n", tampered(request, _chip_shape(lambda s: [1, *s[1:]])),
         f"chips must have shape (2, {chip}, {chip}, 3), got (1, {chip}, {chip}, 3)"),
        ("n larger than carried", tampered(request, _lie_about_n),
         f"chips (3, {chip}, {chip}, 3) needs {3 * chip * chip * 3} bytes, the buffer has {chip_bytes}"),
        ("n larger, shapes honest", tampered(request, _set("n", 3)),
         f"chips must have shape (3, {chip}, {chip}, 3), got (2, {chip}, {chip}, 3)"),
        ("chip size differs", tampered(request, _chip_shape(lambda s: [s[0], s[1] + 4, s[2] + 4, 3])),
         f"chips must have shape (2, {chip}, {chip}, 3), got (2, {chip + 4}, {chip + 4}, 3)"),
        ("grey chips", tampered(request, _chip_shape(lambda s: [*s[:3], 1])), "chips must have shape"),
        ("crop size differs", tampered(request, lambda h, b: spec(h, "gender").update(shape=[2, 32, 32, 4])),
         "gender must have shape (2, 64, 64, 1), got (2, 32, 32, 4)"),
        ("negative axis", tampered(request, _chip_shape(lambda s: [s[0], -s[1], s[2], 3])), "chips must have shape"),
        ("buffer shorter", tampered(request, _resize_buffer("chips", -1)),
         f"needs {chip_bytes} bytes, the buffer has {chip_bytes - 1}"),
        ("buffer longer", tampered(request, _resize_buffer("chips", 1)),
         f"needs {chip_bytes} bytes, the buffer has {chip_bytes + 1}"),
        ("crop buffer empty", tampered(request, _resize_buffer("gender", -(2 * 64 * 64 * 4))),
         "the buffer has 0"),
        ("NaN in crops", tampered(request, _nan_in("age", float("nan"))), "age holds NaN or infinite values"),
        ("inf in crops", tampered(request, _nan_in("gender", float("-inf"))), "gender holds NaN or infinite values"),
        ("no chips", tampered(request, _only_heads), "request 7: no chips"),
        ("head not run", valid_request(2, chip, heads=("age", "emotion")), "this worker does not run emotion"),
        ("hello with a buffer", [*hello, b"x"], "hello: expected 1 frame, got 2"),
        ("hello bad sha", tampered(hello, _set("sha256", "XYZ")), "hello header: sha256: String should match"),
        ("hello unknown head", tampered(hello, _set("heads", ["age", "beauty"])), "hello header: heads.1"),
        ("hello extra key", tampered(hello, _set("sha", SHA)), "hello header: sha: Extra inputs are not permitted"),
    ]


HOSTILE = hostile_requests()


def hostile_results() -> list[tuple[str, list[bytes], str]]:
    """What a client (embedding length DIM) must refuse from a worker."""
    result = valid_result(2)
    return [
        ("request sent to a client", valid_request(), "unexpected message type 'request'"),
        ("hello sent to a client", Hello("emb", SHA, ()).to_frames(), "unexpected message type 'hello'"),
        ("wrong embedding dim", valid_result(2, DIM + 1), f"embedding must have shape (2, {DIM}), got (2, {DIM + 1})"),
        ("embedding rank 1", tampered(result, lambda h, b: spec(h, "embedding").update(shape=[2 * DIM])),
         f"embedding must have shape (2, {DIM})"),
        ("float64 embedding", tampered(result, lambda h, b: spec(h, "embedding").update(dtype="<f8")),
         "embedding must be <f4, got '<f8'"),
        ("no embedding", tampered(result, lambda h, b: (h["arrays"].pop(0), b.pop(0))), "result 7: no embedding"),
        ("emotion classes", tampered(result, lambda h, b: spec(h, "emotion").update(shape=[2, 8])),
         f"emotion must have shape (2, {EMOTION_CLASSES}), got (2, 8)"),
        ("age rank 2", tampered(result, lambda h, b: spec(h, "age").update(shape=[2, 1])), "age must have shape (2,)"),
        ("NaN embedding", tampered(result, _nan_in("embedding", float("nan"))), "embedding holds NaN"),
        ("n says 3", tampered(result, _set("n", 3)), "embedding must have shape (3, 4), got (2, 4)"),
        ("negative infer_ms", tampered(result, _set("infer_ms", -1)), "result header: infer_ms: Input should be"),
        ("queued_ms null", tampered(result, _set("queued_ms", None)), "result header: queued_ms"),
        ("NaN literal in the header", [result[0].replace(b'"infer_ms":1.5', b'"infer_ms":NaN'), *result[1:]],
         "header is not JSON"),
        ("bad sha", tampered(result, _set("sha256", "ab")), "result header: sha256: String should match"),
        ("batch zero", tampered(result, _set("batch", 0)), "result header: batch: Input should be greater than"),
        ("error with buffers", [*ErrorReply("no").to_frames(), b"x"], "error: expected 1 frame, got 2"),
        ("error too long", [orjson.dumps({"protocol": PROTOCOL, "type": "error", "id": None, "error": "x" * 501})],
         "error header: error: String should have at most 500 characters"),
        ("welcome tiny chips", tampered(Welcome("emb", SHA, (), 112, 32, "cpu").to_frames(), _set("chip_size", 8)),
         "welcome header: chip_size: Input should be greater than or equal to 16"),
        ("welcome with a buffer", [*Welcome("emb", SHA, (), 112, 32, "cpu").to_frames(), b""],
         "welcome: expected 1 frame, got 2"),
    ]


# -- round trips -------------------------------------------------------------------------------------------
ROUND_TRIPS = [
    Hello("dlib_resnet_v1", SHA, ("age", "gender", "emotion")),
    Hello("arcface:0c9ad2a83969", SHA, ()),
    Welcome("dlib_resnet_v1", SHA, ("age",), 150, 32, "cuda"),
    InferenceRequest(1, "emb", request_arrays(3, heads=("age", "gender", "emotion"))),
    InferenceRequest((1 << 62) - 1, "emb", request_arrays(1, heads=())),
    InferenceResult(5, "emb", SHA, result_arrays(3), batch=7, infer_ms=12.345, queued_ms=0.5, device="cpu"),
    InferenceResult(6, "emb", SHA, {"embedding": result_arrays(1)["embedding"]}, batch=1, infer_ms=0.0,
                    queued_ms=0.0, device="cuda"),
    ErrorReply("request 3: no chips", 3),
    ErrorReply("header is not JSON"),
]


_ENDPOINTS = itertools.count()


def over_zmq(frames: list[Any]) -> list[zmq.Frame]:
    """The frames as a receiver sees them: zero-copy zmq.Frame objects off a real socket."""
    context = zmq.Context.instance()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    endpoint = f"inproc://protocol-{next(_ENDPOINTS)}"  # a closed socket's name is freed asynchronously
    try:
        receiver.bind(endpoint)
        sender.connect(endpoint)
        sender.send_multipart(frames, copy=False)
        return receiver.recv_multipart(copy=False)
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)


@pytest.mark.parametrize("transport", ["direct", "zmq"])
@pytest.mark.parametrize("message", ROUND_TRIPS, ids=lambda m: f"{m.type}")
def test_every_message_round_trips(message, transport):
    frames = message.to_frames()
    if transport == "zmq":
        frames = over_zmq(frames)
    back = from_frames(frames)
    assert type(back) is type(message)
    if isinstance(message, InferenceRequest | InferenceResult):
        assert set(vars(back)) == set(vars(message))
        for key, value in vars(message).items():
            if key != "arrays":
                assert getattr(back, key) == value, key
        assert list(back.arrays) == list(message.arrays)
        for name, array in message.arrays.items():
            assert back.arrays[name].dtype == array.dtype, name
            np.testing.assert_array_equal(back.arrays[name], array, err_msg=name)
        assert back.n == message.n
    else:
        assert back == message


def test_headers_carry_the_protocol_and_one_buffer_per_array():
    message = ROUND_TRIPS[3]
    frames = message.to_frames()
    header = orjson.loads(frames[0])
    assert header["protocol"] == PROTOCOL and header["type"] == "request" and header["n"] == 3
    assert [a["name"] for a in header["arrays"]] == ["chips", "age", "gender", "emotion"]
    assert spec(header, "chips") == {"name": "chips", "dtype": "|u1", "shape": [3, S, S, 3]}
    assert len(frames) == 1 + 4
    assert "stream" not in header and "tracks" not in header  # what the faces are about stays with the client


def test_non_contiguous_arrays_are_sent_in_c_order():
    chips = np.asfortranarray(request_arrays(2)["chips"])
    back = from_frames(over_zmq(InferenceRequest(1, "emb", {"chips": chips}).to_frames()), WORKER)
    np.testing.assert_array_equal(back.arrays["chips"], chips)


def test_valid_messages_pass_the_limits_they_are_meant_for():
    assert isinstance(from_frames(valid_request(2), WORKER), InferenceRequest)
    assert isinstance(from_frames(valid_request(2, heads=()), WORKER), InferenceRequest)  # heads are optional
    assert isinstance(from_frames(valid_request(8), WORKER), InferenceRequest)  # exactly max_faces
    assert isinstance(from_frames(valid_result(2), CLIENT), InferenceResult)
    assert isinstance(from_frames(Hello("emb", SHA, ()).to_frames(), WORKER), Hello)
    assert isinstance(from_frames(ErrorReply("x", 1).to_frames(), CLIENT), ErrorReply)
    # default limits: any chip size and embedding length
    assert from_frames(valid_request(2, chip=40)).arrays["chips"].shape == (2, 40, 40, 3)
    assert from_frames(valid_result(2, dim=512)).arrays["embedding"].shape == (2, 512)


def test_empty_message():
    with pytest.raises(ProtocolError, match="empty message"):
        from_frames([], WORKER)


@pytest.mark.parametrize("case, frames, fragment", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_worker_side_refusals(case, frames, fragment):
    for received in (frames, over_zmq(frames)):
        with pytest.raises(ProtocolError) as caught:
            from_frames(received, WORKER)
        text = str(caught.value)
        assert fragment in text, text
        assert "\n" not in text and len(text) <= 500, text  # one line, safe to log and to send back


HOSTILE_RESULTS = hostile_results()


@pytest.mark.parametrize("case, frames, fragment", HOSTILE_RESULTS, ids=[c[0] for c in HOSTILE_RESULTS])
def test_client_side_refusals(case, frames, fragment):
    with pytest.raises(ProtocolError) as caught:
        from_frames(frames, CLIENT)
    text = str(caught.value)
    assert fragment in text, text
    assert "\n" not in text


@pytest.mark.parametrize("shape, fragment", [
    ([2, 0], "embedding has an empty axis (2, 0)"),
    ([2, -4], "embedding has an empty axis (2, -4)"),
])
def test_zero_sized_axes_are_refused(shape, fragment):
    frames = tampered(valid_result(2), lambda h, b: spec(h, "embedding").update(shape=shape))
    with pytest.raises(ProtocolError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        from_frames(frames)  # no embedding_dim limit: only the empty-axis rule stands in the way


def test_a_huge_declared_axis_is_compared_not_allocated():
    frames = tampered(valid_result(2), lambda h, b: spec(h, "embedding").update(shape=[2, 1 << 60]))
    with pytest.raises(ProtocolError, match=f"needs {2 * 4 << 60} bytes, the buffer has {2 * DIM * 4}"):
        from_frames(frames)


def test_error_reply_is_cut_to_500_characters():
    back = from_frames(ErrorReply("x" * 2000, 9).to_frames(), CLIENT)
    assert back == ErrorReply("x" * 500, 9)


# -- Welcome.mismatch -------------------------------------------------------------------------------------
WELCOME = Welcome("dlib_resnet_v1", SHA, ("age", "gender"), 150, 32, "cpu")


@pytest.mark.parametrize("embedder, sha, chip, heads, fragments", [
    ("dlib_resnet_v1", SHA, 150, ("age", "gender"), None),
    ("dlib_resnet_v1", SHA, 150, ("age",), None),  # fewer heads than the worker runs is fine
    ("dlib_resnet_v1", SHA, 150, (), None),
    ("arcface:0c9ad2a83969", SHA, 150, ("age",),
     ["runs embedder dlib_resnet_v1 (sha256 abababababab)", "this host arcface:0c9ad2a83969", "not comparable"]),
    ("dlib_resnet_v1", OTHER_SHA, 150, ("age",), ["(sha256 abababababab)", "(sha256 cdcdcdcdcdcd)", "same"]),
    ("dlib_resnet_v1", SHA, 112, ("age",), ["expects 150px chips, this host makes 112px ones"]),
    ("dlib_resnet_v1", SHA, 150, ("emotion", "age", "beauty"), ["does not run the attribute heads beauty, emotion"]),
])
def test_welcome_mismatch(embedder, sha, chip, heads, fragments):
    problem = WELCOME.mismatch(embedder, sha, chip, heads)
    if fragments is None:
        assert problem is None
    else:
        assert problem is not None and "\n" not in problem
        for fragment in fragments:
            assert fragment in problem, problem
