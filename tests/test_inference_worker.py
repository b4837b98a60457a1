"""A real InferenceWorker (real models, real ZeroMQ over tcp://127.0.0.1) against honest and hostile peers.

The worker runs the default embedder (dlib_resnet, 150 px chips) and two of the three heads, age and
gender, so a request for emotion is one for a head it does not run. Most tests serve from a background
thread; the ones that must control which requests share a batch call `step()` themselves.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import orjson
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from streamer.config import Settings
from streamer.errors import ConfigError
from streamer.infer.batch import InferenceModels
from streamer.models.factory import ModelFactory
from streamer.pipeline.inference_client import InferenceClient
from streamer.pipeline.inference_worker import InferenceWorker
from streamer.pipeline.protocol import (
    ErrorReply,
    Hello,
    InferenceRequest,
    InferenceResult,
    Limits,
    Message,
    Welcome,
    from_frames,
)
from streamer.sockets import (
    ClientKeys,
    ServerKeys,
    SocketDefaults,
    client_files,
    generate_keys,
    server_files,
    stop_authenticators,
)
from streamer.track.processor import ChipBatch
from test_protocol import hostile_requests

HEADS = ("age", "gender")
ANY_PORT = "tcp://127.0.0.1:*"
REPLIES = Limits(accept=frozenset({"welcome", "result", "error"}))
CHANNELS = {"age": 3, "gender": 1, "emotion": 1}


# -- fixtures ----------------------------------------------------------------------------------------------
def worker_settings(model_dir, **inference) -> Settings:
    return Settings(model_dir=model_dir, runtime={"device": "cpu", "threads": 1}, attributes={"enabled": list(HEADS)},
                    inference=inference)


@pytest.fixture(scope="module")
def settings(model_dir) -> Settings:
    return worker_settings(model_dir)


@pytest.fixture(scope="module")
def models(settings) -> InferenceModels:
    return InferenceModels.load(ModelFactory(settings))


@pytest.fixture(scope="module")
def sha(settings) -> str:
    return ModelFactory(settings).embedder_sha256


@pytest.fixture(scope="module")
def peers() -> Iterator[zmq.Context]:
    """The clients' context: another process, as far as the worker's context can tell."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


class Served:
    """A worker serving from a background thread; `crashed` holds what killed it, if anything did."""

    def __init__(self, worker: InferenceWorker) -> None:
        self.worker = worker
        self.crashed: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.worker.serve()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.crashed.append(exc)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.crashed

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert not self.crashed, f"the worker crashed: {self.crashed[0]!r}"


@contextmanager
def serving(settings, models, sha, endpoint: str = ANY_PORT, keys=None) -> Iterator[Served]:  # noqa: ANN001
    served = Served(InferenceWorker(settings, endpoint, models, keys=keys, sha256=sha))
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture()
def served(settings, models, sha) -> Iterator[Served]:
    with serving(settings, models, sha) as running:
        yield running


# -- peers -------------------------------------------------------------------------------------------------
def request_arrays(n: int, seed: int, heads=HEADS, chip: int = 150) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"chips": rng.integers(0, 256, (n, chip, chip, 3), dtype=np.uint8)}
    for head in heads:
        arrays[head] = rng.random((n, 64, 64, CHANNELS[head]), dtype=np.float32)
    return arrays


def chip_batch(n: int, seed: int, heads=HEADS, stream: str = "cam0") -> ChipBatch:
    return ChipBatch(stream=stream, frame=seed, pts=seed / 25, decoded_at=0.0,
                     tracks=tuple(range(100 * seed, 100 * seed + n)),
                     boxes=np.tile(np.float32([10, 10, 60, 60]), (n, 1)), arrays=request_arrays(n, seed, heads))


def dealer(context: zmq.Context, endpoint: str) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


def receive(socket: zmq.Socket, timeout_s: float = 5.0) -> Message:
    assert socket.poll(int(timeout_s * 1000)), f"no reply within {timeout_s} s"
    return from_frames(socket.recv_multipart(copy=False), REPLIES)


def ask(socket: zmq.Socket, frames: list[Any], timeout_s: float = 5.0) -> Message:
    socket.send_multipart(frames, copy=False)
    return receive(socket, timeout_s)


def client(context: zmq.Context, endpoint: str, worker_or_models, sha: str, **kwargs) -> InferenceClient:  # noqa: ANN001
    models = getattr(worker_or_models, "models", worker_or_models)
    return InferenceClient(endpoint, embedder=models.embedder.spec.id, sha256=sha, heads=HEADS,
                           chip_size=models.chip_size, embedding_dim=models.embedder.spec.dim, context=context,
                           **kwargs)


def check_result(result: InferenceResult, arrays: dict[str, np.ndarray], models: InferenceModels) -> None:
    """The result is exactly what the models make of these faces: same rows, same values, no other keys."""
    expected = models.run(arrays)
    assert result.n == len(arrays["chips"])
    assert set(result.arrays) == set(expected), (set(result.arrays), set(expected))
    for key, value in expected.items():
        assert result.arrays[key].shape == value.shape, key
        np.testing.assert_allclose(result.arrays[key], value, rtol=1e-4, atol=1e-4, err_msg=key)


def roundtrip(peer: InferenceClient, batch: ChipBatch, timeout_s: float) -> list:
    assert peer.submit(batch, live=False)
    return peer.wait_idle(timeout_s)


# -- (a) (b) hello and a valid request ------------------------------------------------------------------
def test_hello_gets_a_welcome_with_the_embedder_and_its_hash(served, peers, models, sha):
    socket = dealer(peers, served.worker.endpoint)
    try:
        welcome = ask(socket, Hello("anything", "00" * 32, ("age",)).to_frames())
    finally:
        socket.close()
    assert welcome == Welcome("dlib_resnet_v1", sha, HEADS, 150, 32, "cpu")
    assert welcome.embedder == models.embedder.spec.id and len(welcome.sha256) == 64


def test_a_valid_request_gets_what_the_models_compute(served, peers, models, sha):
    socket = dealer(peers, served.worker.endpoint)
    arrays = request_arrays(3, seed=1)
    try:
        result = ask(socket, InferenceRequest(41, models.embedder.spec.id, arrays).to_frames())
    finally:
        socket.close()
    assert isinstance(result, InferenceResult), result
    assert (result.id, result.embedder, result.sha256, result.device) == (41, "dlib_resnet_v1", sha, "cpu")
    assert result.batch == 3 and result.infer_ms > 0 and result.queued_ms >= 0
    assert result.arrays["embedding"].shape == (3, 128)
    check_result(result, arrays, models)
    assert served.worker.batches == 1 and served.worker.faces == 3 and served.worker.refused == 0


def test_chips_only_request_gets_only_embeddings(served, peers, models):
    socket = dealer(peers, served.worker.endpoint)
    arrays = request_arrays(2, seed=2, heads=())
    try:
        result = ask(socket, InferenceRequest(1, models.embedder.spec.id, arrays).to_frames())
    finally:
        socket.close()
    assert set(result.arrays) == {"embedding"}
    check_result(result, arrays, models)


# -- (c) hostile peers -------------------------------------------------------------------------------------
HOSTILE = hostile_requests(chip=150, max_faces=32)


def test_every_malformed_message_gets_an_error_and_the_worker_keeps_serving(served, peers, models, sha):
    hostile = dealer(peers, served.worker.endpoint)
    try:
        for case, frames, fragment in HOSTILE:
            reply = ask(hostile, frames, timeout_s=2)
            assert isinstance(reply, ErrorReply), (case, reply)
            assert fragment in reply.error, (case, reply.error)
            assert reply.id is None
            assert served.alive, f"the worker died on {case!r}: {served.crashed}"
        assert served.worker.refused == len(HOSTILE)

        # 200 more, as fast as they go, then an honest client must still be served promptly
        garbage = list(itertools.islice(itertools.cycle(frames for _, frames, _ in HOSTILE), 200))
        for frames in garbage:
            hostile.send_multipart(frames, copy=False)
        honest = client(peers, served.worker.endpoint, models, sha)
        try:
            batch = chip_batch(2, seed=3)
            started = time.monotonic()
            answered = roundtrip(honest, batch, timeout_s=2.0)
            assert time.monotonic() - started < 2.0
            assert len(answered) == 1 and answered[0].batch is batch
            check_result(answered[0].result, dict(batch.arrays), models)
            assert honest.welcome is not None
        finally:
            honest.close()
        errors = [receive(hostile, timeout_s=5) for _ in garbage]
        assert all(isinstance(e, ErrorReply) for e in errors)
        assert not hostile.poll(100)  # one reply per message, never more
        assert served.worker.refused == len(HOSTILE) + 200
        assert served.alive
    finally:
        hostile.close()


# -- (d) cross-talk ----------------------------------------------------------------------------------------
def lies(models: InferenceModels, first_id: int) -> list[tuple[int, list[Any]]]:
    """Requests whose header does not match their buffers: more faces declared than carried, shapes off."""
    embedder = models.embedder.spec.id
    out = []
    for i in range(6):
        request_id = first_id + i
        frames = InferenceRequest(request_id, embedder, request_arrays(2, seed=900 + i)).to_frames()
        header = orjson.loads(frames[0])
        if i % 3 == 0:  # declares 4 faces, carries 2: shapes and n say 4
            header["n"] = 4
            for spec in header["arrays"]:
                spec["shape"][0] = 4
        elif i % 3 == 1:  # n says 5, shapes say 2
            header["n"] = 5
        else:  # chips claim 3 rows, crops 2
            header["arrays"][0]["shape"][0] = 3
        out.append((request_id, [orjson.dumps(header), *frames[1:]]))
    return out


def test_a_lying_client_gets_errors_and_the_honest_one_only_its_own_faces(models, sha, peers, model_dir):
    """Both clients' requests are queued before the worker looks, so the batches mix their faces."""
    worker = InferenceWorker(worker_settings(model_dir, max_wait_ms=300), ANY_PORT, models, sha256=sha)
    honest = client(peers, worker.endpoint, worker, sha)
    liar = dealer(peers, worker.endpoint)
    try:
        batches = [chip_batch(1 + i % 4, seed=10 + i) for i in range(12)]
        liar_valid = {5000 + i: request_arrays(2, seed=500 + i) for i in range(5)}
        liar_lies = lies(models, 6000)
        sends = iter(liar_lies)
        for i, batch in enumerate(batches):  # interleave: honest, lie, honest, liar's own valid request, ...
            assert honest.submit(batch, live=False)
            if i % 2 == 0:
                liar.send_multipart(next(sends)[1], copy=False)
            elif (request_id := 5000 + i // 2) in liar_valid:
                liar.send_multipart(InferenceRequest(request_id, worker.embedder_id, liar_valid[request_id])
                                    .to_frames(), copy=False)
        expected_faces = sum(len(b) for b in batches) + 2 * len(liar_valid)
        deadline = time.monotonic() + 10
        while worker.faces < expected_faces:
            worker.step(50)
            assert time.monotonic() < deadline, "the worker did not run every valid face"
        answered = honest.wait_idle(5)
        liar_replies = [receive(liar) for _ in range(len(liar_valid) + len(liar_lies))]
    finally:
        honest.close()
        liar.close()
        worker.socket.close(linger=0)

    assert len(answered) == len(batches) and honest.pending == 0 and honest.invalid == 0
    by_batch = {id(a.batch): a for a in answered}
    for batch in batches:
        got = by_batch[id(batch)]
        assert got.result.n == len(batch)  # exactly its own rows
        check_result(got.result, dict(batch.arrays), models)
    assert any(a.result.batch > len(a.batch) for a in answered), "no batch mixed the two clients' faces"

    errors = [r for r in liar_replies if isinstance(r, ErrorReply)]
    results = {r.id: r for r in liar_replies if isinstance(r, InferenceResult)}
    assert len(errors) == len(liar_lies) and all(e.id is None for e in errors)  # refused before it was queued
    assert set(results) == set(liar_valid)
    for request_id, arrays in liar_valid.items():
        check_result(results[request_id], arrays, models)
    assert worker.refused == len(liar_lies)


def test_concurrent_clients_with_a_liar_never_get_each_others_rows(models, sha, peers, model_dir):
    """The same with real concurrency: the worker, the liar and the honest client on their own threads."""
    with serving(worker_settings(model_dir, max_wait_ms=30), models, sha) as served:
        endpoint = served.worker.endpoint
        liar_seen: list[Message] = []

        def lie() -> None:
            socket = dealer(peers, endpoint)
            try:
                for _, frames in lies(models, 7000) * 5:
                    socket.send_multipart(frames, copy=False)
                    time.sleep(0.002)
                while socket.poll(1000):
                    liar_seen.append(from_frames(socket.recv_multipart(copy=False), REPLIES))
            finally:
                socket.close()

        liar = threading.Thread(target=lie)
        honest = client(peers, endpoint, models, sha)
        try:
            liar.start()
            batches = [chip_batch(1 + i % 3, seed=40 + i) for i in range(10)]
            for batch in batches:
                assert honest.submit(batch, live=False)
                time.sleep(0.005)
            answered = honest.wait_idle(10)
            liar.join(20)
        finally:
            honest.close()
        assert served.alive
    assert len(answered) == len(batches) and honest.invalid == 0 and honest.rejected == 0
    for got in answered:
        assert got.result.n == len(got.batch)
        check_result(got.result, dict(got.batch.arrays), models)
    assert len(liar_seen) == 30 and all(isinstance(m, ErrorReply) for m in liar_seen)


def test_clients_sending_different_heads_in_one_batch_get_their_own_rows(models, sha, peers, model_dir):
    """One client sends chips only, others chips and crops, and their requests share a batch: every head's
    rows must be split among the requests that sent crops for it (not by the embedding's offsets)."""
    worker = InferenceWorker(worker_settings(model_dir, max_wait_ms=300), ANY_PORT, models, sha256=sha)
    sockets = [dealer(peers, worker.endpoint) for _ in range(3)]
    embedder = worker.embedder_id
    sent = [  # (socket, id, arrays) in the order the worker will batch them
        (0, 1, request_arrays(1, seed=71, heads=())),
        (1, 2, request_arrays(2, seed=72)),
        (2, 3, request_arrays(1, seed=73, heads=("age",))),
        (0, 4, request_arrays(2, seed=74, heads=())),
        (1, 5, request_arrays(1, seed=75, heads=("gender",))),
    ]
    try:
        for index, request_id, arrays in sent:
            sockets[index].send_multipart(InferenceRequest(request_id, embedder, arrays).to_frames(), copy=False)
            time.sleep(0.01)  # keep the arrival order
        deadline = time.monotonic() + 10
        while worker.faces < 7:
            worker.step(50)
            assert time.monotonic() < deadline, "the worker did not run every face"
        assert worker.batches == 1, "the requests were meant to share one batch"
        replies = {}
        for index, request_id, _ in sent:
            reply = receive(sockets[index])
            replies[reply.id] = (index, reply)
    finally:
        for socket in sockets:
            socket.close()
        worker.socket.close(linger=0)
    for index, request_id, arrays in sent:
        got_index, result = replies[request_id]
        assert got_index == index  # back to the socket that asked
        assert isinstance(result, InferenceResult), result
        assert result.batch == 7
        check_result(result, arrays, models)  # rows and keys: only the heads it sent crops for


# -- (e) another embedder ----------------------------------------------------------------------------------
def test_a_request_for_another_embedder_is_refused_naming_both(served, peers):
    socket = dealer(peers, served.worker.endpoint)
    try:
        reply = ask(socket, InferenceRequest(12, "arcface:0c9ad2a83969", request_arrays(1, seed=5)).to_frames())
    finally:
        socket.close()
    assert isinstance(reply, ErrorReply) and reply.id == 12
    assert "dlib_resnet_v1" in reply.error and "arcface:0c9ad2a83969" in reply.error, reply.error
    assert served.worker.batches == 0 and served.worker.refused == 1


# -- (f) ZMQ_MAXMSGSIZE --------------------------------------------------------------------------------------
def test_a_frame_over_the_size_cap_disconnects_that_peer_only(served, peers, models, sha):
    endpoint = served.worker.endpoint
    honest = client(peers, endpoint, models, sha)
    big = peers.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    monitor = big.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)  # before connect: no event missed
    big.connect(endpoint)
    try:
        assert len(roundtrip(honest, chip_batch(1, seed=6), 5)) == 1  # connected and served
        assert recv_event(monitor, zmq.EVENT_CONNECTED, 5)
        big.send(memoryview(bytearray(SocketDefaults.MAX_MESSAGE_BYTES + 1)), copy=False)
        assert recv_event(monitor, zmq.EVENT_DISCONNECTED, 10), "the worker kept a peer sending an oversized frame"
        assert not big.poll(300)  # dropped by libzmq: the application never saw it, so there is no error reply
        assert served.worker.refused == 0
        batch = chip_batch(2, seed=7)
        answered = roundtrip(honest, batch, 5)
        assert len(answered) == 1 and answered[0].batch is batch
        check_result(answered[0].result, dict(batch.arrays), models)
        assert served.alive
    finally:
        big.disable_monitor()
        monitor.close(linger=0)
        big.close()
        honest.close()


def recv_event(monitor: zmq.Socket, event: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if monitor.poll(100) and recv_monitor_message(monitor)["event"] == event:
            return True
    return False


# -- (g) CURVE ---------------------------------------------------------------------------------------------
def test_curve_worker_serves_only_listed_clients(settings, models, sha, tmp_path):
    keys_dir = tmp_path / "keys"
    generate_keys(keys_dir, ["good"])
    generate_keys(tmp_path / "elsewhere", ["stranger"])
    server_public = server_files(keys_dir)[0]
    good_keys = ClientKeys.load(client_files(keys_dir, "good")[1], server_public)
    stranger_keys = ClientKeys.load(client_files(tmp_path / "elsewhere", "stranger")[1], server_public)
    clients_context = zmq.Context()
    try:
        with serving(settings, models, sha, keys=ServerKeys.load(keys_dir, setting="inference.keys")) as served:
            endpoint = served.worker.endpoint
            assert endpoint.startswith("tcp://127.0.0.1:")
            good = client(clients_context, endpoint, models, sha, keys=good_keys)
            plain = client(clients_context, endpoint, models, sha)
            stranger = client(clients_context, endpoint, models, sha, keys=stranger_keys)
            try:
                batch = chip_batch(2, seed=8)
                answered = roundtrip(good, batch, 5)
                assert len(answered) == 1 and good.welcome is not None
                check_result(answered[0].result, dict(batch.arrays), models)

                for outsider in (plain, stranger):  # queued or dropped (no handshake, no pipe): never served
                    outsider.submit(chip_batch(1, seed=9), live=True)
                started = time.monotonic()
                while time.monotonic() - started < 1.5:
                    assert plain.receive(50) == [] and stranger.receive(50) == []
                assert plain.welcome is None and stranger.welcome is None
                assert served.worker.faces == 2  # nothing of theirs reached a batch

                again = chip_batch(3, seed=10)
                answered = roundtrip(good, again, 5)
                assert len(answered) == 1 and answered[0].batch is again
                check_result(answered[0].result, dict(again.arrays), models)
            finally:
                for peer in (good, plain, stranger):
                    peer.close()
    finally:
        stop_authenticators(zmq.Context.instance())
        clients_context.destroy(linger=0)


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:*", "tcp://*:5599"])
def test_binding_beyond_loopback_without_keys_is_a_config_error(settings, models, sha, endpoint):
    with pytest.raises(ConfigError) as caught:
        InferenceWorker(settings, endpoint, models, sha256=sha)
    text = str(caught.value)
    assert text.startswith("inference.endpoint:") and "inference.keys" in text and "\n" not in text, text



def test_a_peer_flooding_garbage_does_not_starve_the_batches(served, peers, models, sha):
    """Garbage arriving faster than it can be refused must not keep a due batch from running."""
    endpoint = served.worker.endpoint
    stop = threading.Event()

    def flood() -> None:
        socket = dealer(peers, endpoint)
        socket.setsockopt(zmq.RCVHWM, 10)  # we never read the errors: let the worker drop them
        try:
            while not stop.is_set():
                for _ in range(1000):
                    try:
                        socket.send(b"{nope", zmq.NOBLOCK)
                    except zmq.Again:
                        time.sleep(0.001)
        finally:
            socket.close()

    flooder = threading.Thread(target=flood)
    honest = client(peers, endpoint, models, sha)
    try:
        flooder.start()
        time.sleep(0.3)  # the flood is on
        for seed in (20, 21, 22):
            batch = chip_batch(2, seed=seed)
            started = time.monotonic()
            answered = roundtrip(honest, batch, timeout_s=2.0)
            assert len(answered) == 1, f"no result within 2 s while another peer floods ({served.worker.refused} refused)"
            assert time.monotonic() - started < 2.0
            check_result(answered[0].result, dict(batch.arrays), models)
    finally:
        stop.set()
        flooder.join(5)
        honest.close()
    assert served.worker.refused > 0 and served.alive
