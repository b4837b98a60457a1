"""InferenceClient against a ROUTER socket the test drives by hand (pure logic), and against a real worker.

The hand-driven worker reads the client's hello and requests with the real protocol and answers with
whatever the test wants, true or false, so matching, expiry, drops and mismatches are tested exactly.
"""

from __future__ import annotations

import socket as stdsocket
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import zmq

from streamer.config import Settings
from streamer.infer.batch import InferenceModels
from streamer.models.factory import ModelFactory
from streamer.pipeline.inference_client import InferenceClient, InferenceMismatch
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
from streamer.sockets import SocketDefaults, SocketKind, bound_endpoint, make_socket
from streamer.track.processor import ChipBatch

SHA = "ab" * 32
OTHER_SHA = "cd" * 32
EMBEDDER = "emb-a"
CHIP = 16
DIM = 4
HEADS = ("age",)
ANY_PORT = "tcp://127.0.0.1:*"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWorker:
    """A ROUTER the test drives: it decodes what the client sends and answers what it is told to."""

    def __init__(self, context: zmq.Context, endpoint: str = ANY_PORT) -> None:
        self.socket = make_socket(context, SocketKind.ROUTER, hwm=1000, bind=endpoint)
        self.endpoint = bound_endpoint(self.socket)
        self.limits = Limits(chip_size=CHIP, heads=frozenset(HEADS), accept=frozenset({"hello", "request"}))
        self.peer: bytes | None = None

    def next(self, timeout_s: float = 5.0) -> Message:
        assert self.socket.poll(int(timeout_s * 1000)), f"the client sent nothing within {timeout_s} s"
        identity, *frames = self.socket.recv_multipart(copy=False)
        self.peer = identity.bytes
        return from_frames(frames, self.limits)

    def requests(self, count: int) -> list[InferenceRequest]:
        out = [self.next() for _ in range(count)]
        assert all(isinstance(r, InferenceRequest) for r in out), out
        return out

    def send(self, message) -> None:  # noqa: ANN001
        assert self.peer is not None
        self.socket.send_multipart([self.peer, *message.to_frames()], copy=False)

    def send_frames(self, frames: list) -> None:
        self.socket.send_multipart([self.peer, *frames], copy=False)

    def welcome(self, embedder: str = EMBEDDER, sha256: str = SHA, heads=HEADS, chip: int = CHIP) -> None:  # noqa: ANN001
        self.send(Welcome(embedder, sha256, tuple(heads), chip, 32, "cpu"))

    def close(self) -> None:
        self.socket.close(linger=0)


def result_for(request: InferenceRequest, *, n: int | None = None, embedder: str = EMBEDDER, sha256: str = SHA,
               dim: int = DIM) -> InferenceResult:
    """A result whose embedding row i is (request id, i, the chip's first pixel, 0): traceable to its faces."""
    n = request.n if n is None else n
    chips = request.arrays["chips"]
    embedding = np.zeros((n, dim), np.float32)
    embedding[:, 0] = request.id
    embedding[:, 1] = np.arange(n)
    embedding[: min(n, len(chips)), 2] = chips[:n, 0, 0, 0]
    arrays = {"embedding": embedding, "age": np.full(n, 30.0 + request.id, np.float32)}
    return InferenceResult(request.id, embedder, sha256, arrays, batch=n, infer_ms=1.0, queued_ms=0.5, device="cpu")


def chip_batch(n: int, seed: int, stream: str = "cam0", chip: int = CHIP, heads=HEADS) -> ChipBatch:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    arrays = {"chips": rng.integers(0, 256, (n, chip, chip, 3), dtype=np.uint8)}
    for head in heads:
        arrays[head] = rng.random((n, 64, 64, 3 if head == "age" else 1), dtype=np.float32)
    boxes = np.array([[20 + 50 * i, 30, 60 + 50 * i, 80] for i in range(n)], np.float32)
    return ChipBatch(stream=stream, frame=seed, pts=seed / 25, decoded_at=0.0,
                     tracks=tuple(range(100 * seed, 100 * seed + n)), boxes=boxes, arrays=arrays)


def free_port_endpoint() -> str:
    with stdsocket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def receive_all(client: InferenceClient, count: int, timeout_s: float = 5.0) -> list:
    deadline = time.monotonic() + timeout_s
    answered: list = []
    while len(answered) < count and time.monotonic() < deadline:
        answered.extend(client.receive(timeout_ms=50))
    return answered


def settle(client: InferenceClient, timeout_s: float = 0.3) -> list:
    """Whatever arrives within `timeout_s` (replies the client must ignore are still read)."""
    deadline = time.monotonic() + timeout_s
    answered: list = []
    while time.monotonic() < deadline:
        answered.extend(client.receive(timeout_ms=20))
    return answered


@pytest.fixture()
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture()
def worker(context) -> Iterator[FakeWorker]:
    fake = FakeWorker(context)
    yield fake
    fake.close()


def make_client(context: zmq.Context, endpoint: str, **kwargs) -> InferenceClient:
    options = {"embedder": EMBEDDER, "sha256": SHA, "heads": HEADS, "chip_size": CHIP, "embedding_dim": DIM,
               "context": context, **kwargs}
    return InferenceClient(endpoint, **options)


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def client(context, worker, clock) -> Iterator[InferenceClient]:
    peer = make_client(context, worker.endpoint, clock=clock)
    hello = worker.next()
    assert hello == Hello(EMBEDDER, SHA, HEADS)  # the client introduces itself first
    yield peer
    peer.close()


# -- ids and matching --------------------------------------------------------------------------------------
def test_request_ids_increase_and_each_result_goes_to_its_own_batch(client, worker):
    batches = [chip_batch(2, 1, "cam0"), chip_batch(1, 2, "cam1"), chip_batch(3, 3, "cam0")]
    for batch in batches:
        assert client.submit(batch, live=True)
    requests = worker.requests(3)
    assert [r.id for r in requests] == [1, 2, 3]
    for request, batch in zip(requests, batches):
        assert request.embedder == EMBEDDER and request.n == len(batch)
        assert set(request.arrays) == {"chips", "age"}
        for key, array in batch.arrays.items():
            np.testing.assert_array_equal(request.arrays[key], array)
    assert client.pending == 3 and client.faces_sent == 6

    worker.welcome()
    for request in (requests[2], requests[0], requests[1]):  # answered out of order
        worker.send(result_for(request))
    answered = receive_all(client, 3)
    assert len(answered) == 3 and client.welcome is not None
    for got in answered:
        request = next(r for r in requests if r.id == int(got.result.id))
        batch = batches[request.id - 1]
        assert got.batch is batch  # stream, frame, tracks, boxes: all from the client's own record
        assert (got.batch.stream, got.batch.frame, got.batch.tracks) == (batch.stream, batch.frame, batch.tracks)
        np.testing.assert_array_equal(got.result.arrays["embedding"][:, 0], request.id)
        np.testing.assert_array_equal(got.result.arrays["embedding"][:, 2], batch.arrays["chips"][:, 0, 0, 0])
        assert got.crops is None
    assert client.pending == 0 and client.faces_embedded == 6
    assert client.invalid == client.rejected == client.expired == client.dropped == 0
    assert client.last_answer_at == 1000.0  # the injected clock

    assert client.submit(chip_batch(1, 4), live=True)
    assert worker.requests(1)[0].id == 4


def test_a_result_for_an_unknown_id_is_ignored(client, worker):
    assert client.submit(chip_batch(2, 1), live=True)
    request = worker.requests(1)[0]
    stray = InferenceRequest(99, EMBEDDER, request.arrays)
    worker.send(result_for(stray))
    assert settle(client) == []
    assert client.pending == 1 and client.invalid == 0 and client.faces_embedded == 0
    worker.send(result_for(request))
    answered = receive_all(client, 1)
    assert len(answered) == 1 and answered[0].result.id == request.id


def test_expiry_with_an_injected_clock(context, worker, clock):
    client = make_client(context, worker.endpoint, clock=clock, timeout_s=10.0)
    try:
        worker.next()  # hello
        first, second, third = chip_batch(1, 1), chip_batch(2, 2), chip_batch(1, 3)
        assert client.submit(first, live=True)
        clock.now += 4
        assert client.submit(second, live=True)
        clock.now += 4
        assert client.submit(third, live=True)
        requests = worker.requests(3)

        clock.now += 2.0  # first is exactly 10 s old: not yet
        assert client.expire() == [] and client.expired == 0
        clock.now += 0.01
        assert client.expire() == [first]
        assert client.expired == 1 and client.pending == 2
        assert client.expire() == []  # once

        worker.send(result_for(requests[0]))  # the late answer to an expired request
        assert settle(client) == []
        assert client.faces_embedded == 0 and client.invalid == 0

        worker.send(result_for(requests[2]))  # third is answered in time
        assert [a.batch for a in receive_all(client, 1)] == [third]
        clock.now += 100
        assert client.expire() == [second]
        assert client.expired == 2 and client.pending == 0
    finally:
        client.close()


# -- a full link -------------------------------------------------------------------------------------------
def test_a_full_link_drops_live_faces_at_once_and_file_faces_after_the_timeout(context):
    endpoint = free_port_endpoint()  # nobody listens yet: the DEALER queues up to its high-water mark
    client = make_client(context, endpoint, timeout_s=0.3)
    worker = None
    try:
        sent = 0
        while sent < 10 * SocketDefaults.REQUEST_HWM:
            started = time.monotonic()
            if not client.submit(chip_batch(1, 1), live=True):
                break
            sent += 1
        else:
            pytest.fail("the link never filled")
        assert time.monotonic() - started < 0.05  # a live source never waits
        assert 0 < sent <= SocketDefaults.REQUEST_HWM
        assert client.dropped == 1 and client.pending == sent and client.faces_sent == sent

        started = time.monotonic()
        assert not client.submit(chip_batch(1, 2), live=False)  # a file waits, up to the timeout
        waited = time.monotonic() - started
        assert 0.3 <= waited < 1.5, waited
        assert client.dropped == 2 and client.pending == sent

        # A worker comes up there: the queued requests arrive, the dropped ones never do, ids keep counting.
        worker = FakeWorker(context, endpoint)
        assert isinstance(worker.next(), Hello)
        assert [r.id for r in worker.requests(sent)] == list(range(1, sent + 1))
        deadline = time.monotonic() + 5
        while not client.submit(chip_batch(1, 3), live=True):
            assert time.monotonic() < deadline
        assert worker.requests(1)[0].id > sent + 2
        assert not worker.socket.poll(100)
    finally:
        client.close()
        if worker is not None:
            worker.close()


# -- mismatches --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("welcome, fragments", [
    (dict(embedder="arcface:0c9ad2a83969"),
     ["runs embedder arcface:0c9ad2a83969 (sha256 abababababab)", "this host emb-a (sha256 abababababab)",
      "not comparable"]),
    (dict(sha256=OTHER_SHA), ["(sha256 cdcdcdcdcdcd)", "this host emb-a (sha256 abababababab)"]),
    (dict(chip=112), ["expects 112px chips, this host makes 16px ones"]),
    (dict(heads=()), ["does not run the attribute heads age"]),
])
def test_a_welcome_from_other_models_raises_inference_mismatch(client, worker, welcome, fragments):
    worker.welcome(**welcome)
    with pytest.raises(InferenceMismatch) as caught:
        receive_all(client, 1, timeout_s=2)
    text = str(caught.value)
    assert text.startswith(f"inference.endpoint {worker.endpoint}: ") and "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    assert client.welcome is None


def test_a_matching_welcome_is_kept(client, worker):
    worker.welcome(heads=("age", "gender", "emotion"))  # more heads than we need is fine
    assert receive_all(client, 1, timeout_s=0.3) == []
    assert client.welcome == Welcome(EMBEDDER, SHA, ("age", "gender", "emotion"), CHIP, 32, "cpu")


@pytest.mark.parametrize("embedder, sha256", [("arcface:0c9ad2a83969", SHA), (EMBEDDER, OTHER_SHA)])
def test_a_result_from_another_embedder_raises_inference_mismatch(client, worker, embedder, sha256):
    assert client.submit(chip_batch(2, 1), live=True)
    request = worker.requests(1)[0]
    worker.send(result_for(request, embedder=embedder, sha256=sha256))
    with pytest.raises(InferenceMismatch) as caught:
        receive_all(client, 1, timeout_s=2)
    text = str(caught.value)
    assert "\n" not in text and f"results come from embedder {embedder} (sha256 {sha256[:12]})" in text, text
    assert f"this host uses {EMBEDDER} (sha256 {SHA[:12]})" in text
    assert client.pending == 0 and client.faces_embedded == 0  # never matched against anything


# -- replies that are wrong in other ways ------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3])
def test_a_result_with_the_wrong_row_count_is_invalid_and_not_returned(client, worker, rows):
    batch = chip_batch(2, 1)
    assert client.submit(batch, live=True)
    request = worker.requests(1)[0]
    worker.send(result_for(request, n=rows))
    assert settle(client) == []
    assert client.invalid == 1 and client.pending == 0 and client.faces_embedded == 0


def test_a_reply_that_breaks_the_protocol_is_counted_and_the_request_stays_pending(client, worker):
    assert client.submit(chip_batch(2, 1), live=True)
    request = worker.requests(1)[0]
    worker.send(result_for(request, dim=DIM + 1))  # another embedding length than ours
    worker.send_frames([b"not json"])
    assert settle(client) == []
    assert client.invalid == 2 and client.pending == 1
    worker.send(result_for(request))
    assert len(receive_all(client, 1)) == 1 and client.pending == 0


def test_an_error_reply_rejects_its_request(client, worker):
    assert client.submit(chip_batch(2, 1), live=True)
    assert client.submit(chip_batch(1, 2), live=True)
    first, second = worker.requests(2)
    worker.send(ErrorReply("header is not JSON"))  # about no request of ours in particular
    worker.send(ErrorReply("this worker runs embedder x, the request is for y", first.id))
    assert settle(client) == []
    assert client.rejected == 1 and client.pending == 1
    worker.send(result_for(second))
    assert [a.result.id for a in receive_all(client, 1)] == [second.id]


# -- crops -------------------------------------------------------------------------------------------------
def frame_image() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)


@pytest.mark.parametrize("include_crops, with_image, expected", [
    (True, True, True),
    (True, False, False),  # no frame given: nothing to crop from
    (False, True, False),
])
def test_crops_only_when_asked_for(context, worker, include_crops, with_image, expected):
    client = make_client(context, worker.endpoint, include_crops=include_crops)
    try:
        worker.next()
        batch = chip_batch(3, 1)
        assert client.submit(batch, frame_image() if with_image else None, live=True)
        worker.send(result_for(worker.requests(1)[0]))
        (answered,) = receive_all(client, 1)
    finally:
        client.close()
    if not expected:
        assert answered.crops is None
        return
    assert len(answered.crops) == len(batch)  # one per face
    for crop, box in zip(answered.crops, batch.boxes):
        assert isinstance(crop, bytes) and crop[:2] == b"\xff\xd8" and crop[-2:] == b"\xff\xd9"
        image = cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_COLOR)
        width, height = box[2] - box[0], box[3] - box[1]
        assert image is not None and image.shape[1] >= width and image.shape[0] >= min(height, 120 - box[1])


# -- against a real worker ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(model_dir) -> tuple[Settings, InferenceModels, str]:
    settings = Settings(model_dir=model_dir, runtime={"device": "cpu", "threads": 1},
                        attributes={"enabled": ["age", "gender"]})
    factory = ModelFactory(settings)
    return settings, InferenceModels.load(factory), factory.embedder_sha256


def test_a_real_worker_answers_each_batch_with_its_own_faces(real, context):
    settings, models, sha = real
    worker = InferenceWorker(settings, ANY_PORT, models, sha256=sha)
    spec = models.embedder.spec
    client = InferenceClient(worker.endpoint, embedder=spec.id, sha256=sha, heads=("age", "gender"),
                             chip_size=spec.chip_size, embedding_dim=spec.dim, include_crops=True, context=context)
    try:
        batches = [chip_batch(1 + i % 3, 10 + i, f"cam{i % 2}", chip=spec.chip_size, heads=("age", "gender"))
                   for i in range(6)]
        for batch in batches:
            assert client.submit(batch, frame_image(), live=True)
        answered: list = []
        deadline = time.monotonic() + 10
        while client.pending and time.monotonic() < deadline:
            worker.step(20)
            answered.extend(client.receive(timeout_ms=0))
        answered.extend(client.receive(timeout_ms=100))
    finally:
        client.close()
        worker.socket.close(linger=0)
    assert client.welcome is not None and client.welcome.embedder == spec.id
    assert len(answered) == len(batches) and client.pending == 0 and client.invalid == 0
    assert {id(a.batch) for a in answered} == {id(b) for b in batches}
    for got in answered:
        expected = models.run(dict(got.batch.arrays))
        assert got.result.n == len(got.batch)
        for key, value in expected.items():
            np.testing.assert_allclose(got.result.arrays[key], value, rtol=1e-4, atol=1e-4, err_msg=key)
        assert len(got.crops) == len(got.batch)
    assert client.faces_embedded == client.faces_sent == sum(len(b) for b in batches)
