"""The event wire contract over real ZeroMQ sockets (tcp on 127.0.0.1 with a free port, and inproc)."""

from __future__ import annotations

import io
import json
import re
import threading
import time
import uuid

import cv2
import numpy as np
import orjson
import pytest
import zmq

from streamer.errors import ConfigError
from streamer.publish.events import PipelineStatus
from streamer.publish import (
    KINDS,
    AttributesEvent,
    EventPublisher,
    EventSubscriber,
    Heartbeat,
    Identity,
    StreamStatus,
    TrackEnded,
    TrackStarted,
    TrackUpdated,
    events_json_schema,
    parse_event,
    print_events,
)
from streamer.publish.events import EmotionInfo, GenderInfo, StreamHealth
from streamer.types import Attributes, Emotion, Gender

TCP_ANY_PORT = "tcp://127.0.0.1:*"  # libzmq picks a free port; the publisher reports it in .endpoint
BOX = (120.5, 40.0, 220.25, 170.0)


def inproc() -> str:
    return f"inproc://events-{uuid.uuid4().hex}"


def sample_events(stream: str = "cam1") -> list:
    """One event of every kind, as the pipeline would build them (seq not yet assigned)."""
    face = dict(stream=stream, frame=42, pts=1.4, track=7, box=np.array(BOX, np.float32))
    return [
        StreamStatus(stream=stream, status="reconnected", detail="after 2 attempts"),
        TrackStarted(**face),
        TrackUpdated(**face),
        TrackEnded(**face, duration=3.25, frames=81),
        Identity(**face, name="alice", score=0.91, distance=0.31, votes={"alice": 4, "unknown": 1}),
        Identity(**face, name=None, score=0.12, distance=0.88, votes={"unknown": 2}),
        AttributesEvent.from_attributes(
            Attributes(
                age=31.6,
                gender=Gender("woman", 0.93),
                emotion=Emotion("happy", {label: (0.7 if label == "happy" else 0.05) for label in Emotion.LABELS}),
            ),
            **face,
        ),
        AttributesEvent(**face, age=None, gender=None, emotion=None),
        Heartbeat(
            streams={stream: StreamHealth(fps=29.9, frames=1200, dropped=3, status="connected", reconnects=1)},
            queues={"frames": 2, "chips": 0},
            uptime=40.2,
        ),
        PipelineStatus(inference="down", detail="lost the connection to tcp://127.0.0.1:5560"),
    ]


def warm_up(publisher: EventPublisher, subscribers: list[EventSubscriber], probes: list) -> None:
    """PUB/SUB subscriptions reach the publisher asynchronously ("slow joiner"): publish probes until every
    subscriber has seen one, then drain so the test starts from a quiet socket."""
    pending = set(range(len(subscribers)))
    deadline = time.monotonic() + 10
    while pending:
        assert time.monotonic() < deadline, "subscribers never connected"
        for probe in probes:
            publisher.publish(probe)
        for i in list(pending):
            if subscribers[i].receive(20) is not None:
                pending.discard(i)
    for subscriber in subscribers:
        while subscriber.receive(50) is not None:
            pass


# --- a small JSON Schema checker for the keywords pydantic emits (jsonschema is not a dependency) -------------
def schema_errors(value, schema: dict, root: dict, path: str = "$") -> list[str]:
    if "$ref" in schema:
        return schema_errors(value, root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root, path)
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema["oneOf"]
        results = [schema_errors(value, option, root, path) for option in options]
        return [] if any(not r for r in results) else [f"{path}: matches none of {len(options)} options"]
    errors: list[str] = []
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
             "boolean": bool, "null": type(None)}
    if kind and (not isinstance(value, types[kind]) or (kind in ("integer", "number") and isinstance(value, bool))):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value} > {schema['maximum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if kind == "array":
        if "minItems" in schema and len(value) < schema["minItems"] or len(value) > schema.get("maxItems", 1e9):
            errors.append(f"{path}: wrong length {len(value)}")
        for i, item in enumerate(value):
            item_schema = (schema.get("prefixItems") or [])[i:i + 1] or [schema.get("items", {})]
            errors += schema_errors(item, item_schema[0], root, f"{path}[{i}]")
    if kind == "object":
        properties = schema.get("properties", {})
        errors += [f"{path}: missing {name!r}" for name in schema.get("required", []) if name not in value]
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(item, properties[name], root, f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {name!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(item, schema["additionalProperties"], root, f"{path}.{name}")
    return errors


def wire_schema_errors(payload: dict, schema: dict) -> list[str]:
    mapping = schema["discriminator"]["mapping"]
    if payload.get("kind") not in mapping:
        return [f"$.kind: {payload.get('kind')!r} not in {sorted(mapping)}"]
    return schema_errors(payload, {"$ref": mapping[payload["kind"]]}, schema)


# --- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", [TCP_ANY_PORT, "inproc"])
def test_topic_prefix_filtering_by_kind_and_by_kind_and_stream(endpoint):
    endpoint = inproc() if endpoint == "inproc" else endpoint
    with EventPublisher(endpoint, sndhwm=1000) as publisher:
        prefixes = {"all": "", "identity": "identity.", "identity.cam1": "identity.cam1", "track": "track."}
        subscribers = {name: EventSubscriber(publisher.endpoint, topics=(p,)) for name, p in prefixes.items()}
        try:
            probes = [sample_events("warm")[1], sample_events("cam1")[4]]
            warm_up(publisher, list(subscribers.values()), probes)
            sent = [e for stream in ("cam1", "cam2", "cam10") for e in sample_events(stream)]
            for event in sent:
                publisher.publish(event)
            got = {}
            for name, subscriber in subscribers.items():
                got[name] = []
                while (event := subscriber.receive(300)) is not None:
                    got[name].append(event.topic.decode())
        finally:
            for subscriber in subscribers.values():
                subscriber.close()
    topics = [e.topic.decode() for e in sent]
    assert got["all"] == topics
    assert got["identity"] == [t for t in topics if t.startswith("identity.")] and len(got["identity"]) == 6
    # "identity.cam1" is a byte prefix, so it also matches "identity.cam10": stream ids are matched by prefix.
    assert got["identity.cam1"] == ["identity.cam1"] * 2 + ["identity.cam10"] * 2
    assert got["track"] == [t for t in topics if t.startswith("track.")] and len(got["track"]) == 9
    assert "stream.status.cam2" in topics and "heartbeat.*" in topics


def test_seq_starts_at_one_and_never_skips():
    # inproc: the subscription is attached when connect() returns, so no message is lost to a slow join.
    endpoint = inproc()
    with EventPublisher(endpoint) as publisher, EventSubscriber(endpoint) as subscriber:
        assert publisher.seq == 0
        events = sample_events() * 50
        stamped = [publisher.publish(event) for event in events]
        received = [subscriber.receive(1000) for _ in events]
        assert subscriber.receive(50) is None  # a timeout reads as "no message"
    assert [e.seq for e in stamped] == list(range(1, len(events) + 1))
    assert [e.seq for e in received] == list(range(1, len(events) + 1))
    assert received == stamped
    assert (subscriber.gaps, subscriber.missed, subscriber.invalid, publisher.dropped) == (0, 0, 0, 0)
    assert publisher.sent == publisher.seq == len(events)


def test_publish_is_thread_safe_and_seq_order_is_wire_order():
    endpoint = inproc()
    with EventPublisher(endpoint, sndhwm=100_000) as publisher, \
            EventSubscriber(endpoint, rcvhwm=100_000) as subscriber:
        event = sample_events()[1]
        threads = [threading.Thread(target=lambda: [publisher.publish(event) for _ in range(2000)])
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seqs = [subscriber.receive(1000).seq for _ in range(8000)]
    assert seqs == list(range(1, 8001)) and subscriber.gaps == 0


def test_slow_subscriber_never_blocks_the_publisher():
    total = 100_000
    with EventPublisher(TCP_ANY_PORT, sndhwm=10) as publisher, \
            EventSubscriber(publisher.endpoint, rcvhwm=10) as subscriber:
        warm_up(publisher, [subscriber], [sample_events()[0]])
        first_seq = publisher.seq + 1
        seen_before, received_before, missed_before = subscriber.last_seq, subscriber.received, subscriber.missed
        event = sample_events()[4]
        stop = threading.Event()
        slow_seqs: list[int] = []

        def read_slowly():
            while not stop.is_set():
                message = subscriber.receive(10)
                if message is not None:
                    slow_seqs.append(message.seq)
                    time.sleep(0.001)  # ~1k msg/s: two orders of magnitude slower than the publisher

        reader = threading.Thread(target=read_slowly)
        reader.start()
        started = time.perf_counter()
        publisher_thread = threading.Thread(target=lambda: [publisher.publish(event) for _ in range(total)])
        publisher_thread.start()
        publisher_thread.join(timeout=60)
        elapsed = time.perf_counter() - started
        assert not publisher_thread.is_alive(), "the publisher blocked on a slow subscriber"
        time.sleep(0.2)
        stop.set()
        reader.join()
        while (message := subscriber.receive(200)) is not None:  # what is still queued
            slow_seqs.append(message.seq)

    assert publisher.seq == first_seq - 1 + total
    assert publisher.sent + publisher.dropped == publisher.seq
    assert 0 < len(slow_seqs) < total / 4, "the subscriber was not slow enough to lose messages"
    assert slow_seqs == sorted(slow_seqs)
    # Every message the subscriber did not see is accounted for as a gap, and each gap is (expected, got).
    assert subscriber.gaps > 0 and len(subscriber.gap_log) == min(subscriber.gaps, 1000)
    assert all(got > expected for expected, got in subscriber.gap_log)
    assert subscriber.received - received_before == len(slow_seqs)
    assert len(slow_seqs) + subscriber.missed - missed_before == slow_seqs[-1] - seen_before
    print(f"slow subscriber: {total} published in {elapsed:.2f} s ({total / elapsed:,.0f}/s); "
          f"received {len(slow_seqs)}, {subscriber.gaps} gaps, {subscriber.missed} missed")


def test_every_kind_round_trips_and_matches_the_json_schema():
    schema = events_json_schema()
    json.dumps(schema)  # exportable as is
    assert set(schema["discriminator"]["mapping"]) == set(KINDS)
    endpoint = inproc()
    with EventPublisher(endpoint) as publisher, EventSubscriber(endpoint) as subscriber:
        events = sample_events()
        assert {e.kind for e in events} == set(KINDS)
        for event in events:
            stamped = publisher.publish(event)
            message = subscriber.receive_message(1000)
            assert message.event == stamped and type(message.event) is type(event)
            assert message.crop is None
            payload = orjson.loads(message.payload)
            assert wire_schema_errors(payload, schema) == [], payload
            assert payload["schema"] == "streamer.event/1" and payload["kind"] == event.kind
            assert payload["stream"] == event.stream and message.topic == f"{event.kind}.{event.stream}".encode()
            assert isinstance(payload["ts"], float) and abs(payload["ts"] - time.time()) < 60
            if event.kind not in ("stream.status", "heartbeat", "pipeline.status"):
                assert payload["frame"] == 42 and payload["pts"] == 1.4
                assert payload["track"] == 7 and payload["box"] == list(BOX)
            assert "embedding" not in payload and "crop" not in payload
    unknown = orjson.loads(sample_events()[5].model_copy(update={"seq": 1}).payload())
    assert unknown["name"] is None and unknown["votes"] == {"unknown": 2}  # null, never absent
    # The checker can fail: a payload missing a required field is reported.
    del unknown["score"]
    assert wire_schema_errors(unknown, schema) == ["$: missing 'score'"]


def _tampered(change) -> tuple[bytes, bytes]:
    payload = orjson.loads(sample_events()[4].model_copy(update={"seq": 5}).payload())
    topic = b"identity.cam1"
    result = change(payload)
    if isinstance(result, bytes):
        topic = result
    return topic, orjson.dumps(payload)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: b"identity.cam2", "topic"),
        (lambda p: p.update(seq=0), "seq"),
        (lambda p: p.update(schema="streamer.event/2"), "schema"),
        (lambda p: p.update(kind="face.seen"), "kind"),
        (lambda p: p.update(extra_field=1), "extra_field"),
        (lambda p: p.pop("name"), "name"),
        (lambda p: p.update(box=[1, 2, 3]), "box"),
        (lambda p: p.update(stream="cam.1"), "stream"),
    ],
)
def test_parse_event_rejects_what_is_not_the_contract(change, message):
    topic, payload = _tampered(change)
    with pytest.raises(ValueError, match=message):
        parse_event(topic, payload)


def test_parse_event_accepts_the_untampered_payload():
    topic, payload = _tampered(lambda p: None)
    assert parse_event(topic, payload).name == "alice"


def face_crop(media_dir) -> np.ndarray:
    image = cv2.imread(str(media_dir / "deepface" / "img10.jpg"))
    assert image is not None
    h, w = image.shape[:2]
    return image[h // 6: h // 2, w // 4: 3 * w // 4]


@pytest.mark.parametrize("enabled", [False, True])
def test_crops_and_embeddings_leave_only_when_enabled(enabled, media_dir):
    crop = face_crop(media_dir)
    embedding = (np.arange(128, dtype=np.float32) / 1000).tolist()
    endpoint = inproc()
    with EventPublisher(endpoint, include_crops=enabled, include_embeddings=enabled) as publisher, \
            EventSubscriber(endpoint) as subscriber:
        unstamped = {"seq", "ts", "crop", "embedding"}
        identity = Identity(**sample_events()[4].model_dump(exclude=unstamped), embedding=embedding)
        publisher.publish(identity, crop=crop)
        # A caller that sets the flag itself cannot smuggle a crop out either.
        publisher.publish(TrackStarted(**sample_events()[1].model_dump(exclude=unstamped), crop=True))
        publisher.publish(sample_events()[6], crop=cv2.imencode(".jpg", crop)[1].tobytes())
        messages = [subscriber.receive_message(1000) for _ in range(3)]
    payloads = [orjson.loads(m.payload) for m in messages]
    if not enabled:
        assert all(m.crop is None for m in messages)
        assert all("crop" not in p and "embedding" not in p for p in payloads)
        assert messages[0].event.embedding is None
        return
    decoded = cv2.imdecode(np.frombuffer(messages[0].crop, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == crop.shape
    assert np.abs(decoded.astype(int) - crop).mean() < 8  # JPEG, not noise
    assert payloads[0]["crop"] is True and payloads[0]["embedding"] == pytest.approx(embedding)
    assert messages[1].crop is None and "crop" not in payloads[1]  # no crop given: no flag
    assert payloads[2]["crop"] is True and cv2.imdecode(np.frombuffer(messages[2].crop, np.uint8), 1) is not None


def test_crop_on_a_non_face_event_is_a_caller_error():
    with EventPublisher(inproc(), include_crops=True) as publisher:
        with pytest.raises(ValueError, match="only face events"):
            publisher.publish(sample_events()[0], crop=b"\xff\xd8")


def test_bind_failure_names_the_setting():
    with EventPublisher(TCP_ANY_PORT) as first:
        with pytest.raises(ConfigError, match=r"publish\.endpoint.*in use"):
            EventPublisher(first.endpoint)
    with pytest.raises(ConfigError, match=r"publish\.endpoint"):
        EventPublisher("tcp://256.1.1.1:5556")


def test_subscriber_skips_invalid_messages_and_counts_them():
    endpoint = inproc()
    raw = zmq.Context.instance().socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind(endpoint)
    try:
        with EventSubscriber(endpoint) as subscriber:
            raw.send_multipart([b"identity.cam1", b"{not json"])
            raw.send_multipart([b"heartbeat.*"])
            good = sample_events()[0].model_copy(update={"seq": 1})
            raw.send_multipart([good.topic, good.payload()])
            assert subscriber.receive(1000) == good
            assert subscriber.invalid == 2 and subscriber.received == 1
    finally:
        raw.close()


def test_print_events_writes_one_topic_prefixed_json_line_per_event():
    with EventPublisher(TCP_ANY_PORT) as publisher:
        out = io.StringIO()
        result: list[int] = []
        printer = threading.Thread(
            target=lambda: result.append(print_events(publisher.endpoint, ["identity."], out=out, count=5, timeout=10))
        )
        printer.start()
        events = sample_events()
        while printer.is_alive():  # keep publishing until the late-joining subscriber has its five
            for event in events:
                publisher.publish(event)
            time.sleep(0.005)
        printer.join()
    lines = out.getvalue().splitlines()
    assert result == [5] and len(lines) == 5
    for line in lines:
        topic, payload = line.split(" ", 1)
        assert topic == "identity.cam1"
        event = parse_event(topic.encode(), payload.encode())
        assert event.kind == "identity"
    assert print_events(inproc(), timeout=0.1) == 0  # nobody publishing: returns after the timeout


def test_payload_shape_details():
    event = AttributesEvent(
        stream="cam1", frame=np.int64(3), pts=np.float32(0.5), track=1, box=[0, 0, 10, 10],
        age=np.float32(30.0), gender=GenderInfo(label="man", probability=0.8),
        emotion=EmotionInfo(label="sad", scores={"sad": 0.9}),
    )
    payload = orjson.loads(event.payload())
    assert payload["box"] == [0.0, 0.0, 10.0, 10.0] and payload["age"] == 30.0 and payload["seq"] == 0
    with pytest.raises(ValueError, match="stream"):
        StreamStatus(stream="", status="lost")
    with pytest.raises(ValueError, match="status"):
        StreamStatus(stream="cam1", status="exploded")
    with pytest.raises(ValueError, match="distance"):  # JSON has no NaN: refused when the event is built
        Identity(stream="cam1", frame=0, pts=0.0, track=1, box=BOX, name=None, score=0.1,
                 distance=float("nan"), votes={})
