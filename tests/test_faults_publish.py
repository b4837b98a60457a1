"""Publish faults: subscribers that stop reading (what they lose must be counted by the publisher) and
messages with forged sequence numbers (they must not fool a subscriber's gap counter)."""

from __future__ import annotations

import itertools
import logging
import time

import pytest
import zmq

from streamer.publish.events import StreamStatus, TrackStarted
from streamer.publish.publisher import EventPublisher
from streamer.publish.subscriber import MAX_SEQ_JUMP, EventSubscriber

_inproc_ids = itertools.count()


def inproc() -> str:
    return f"inproc://faults-publish-{next(_inproc_ids)}"


def status(seq: int = 0) -> StreamStatus:
    return StreamStatus(stream="cam1", status="connected", seq=seq)


def drain(subscriber: EventSubscriber, timeout_ms: int = 200) -> list[int]:
    seqs = []
    while (event := subscriber.receive(timeout_ms)) is not None:
        seqs.append(event.seq)
    return seqs


# ----------------------------------------------------------------------------- slow subscribers


def test_dropped_counts_what_a_subscriber_that_stopped_reading_loses_and_no_one_else(caplog):
    """inproc: each pipe holds exactly SNDHWM + RCVHWM messages, so who loses what is deterministic."""
    endpoint = inproc()
    total = 2_000
    caplog.set_level(logging.WARNING, logger="streamer.publish")
    with EventPublisher(endpoint, sndhwm=10) as publisher, \
            EventSubscriber(endpoint, rcvhwm=10) as stalled, \
            EventSubscriber(endpoint, rcvhwm=total + 100) as reader:
        for _ in range(total):
            publisher.publish(status())
        got = drain(reader)
        kept = drain(stalled)
        assert publisher.dropped > 0, "the publisher must count what the stalled subscriber lost"
        dropped = publisher.dropped
        publisher.publish(status())  # the stalled one reads again: its next message shows the gap
        assert stalled.receive(1000).seq == total + 1 and reader.receive(1000).seq == total + 1
    # The reader lost nothing: a subscriber that stops reading costs the others nothing.
    assert got == list(range(1, total + 1)) and reader.gaps == 0
    # The stalled one kept what its queues hold, then lost the rest.
    assert 0 < len(kept) <= 20 and stalled.missed == total - len(kept)
    assert publisher.sent + publisher.dropped == publisher.seq == total + 1
    # libzmq stops offering a subscriber messages once its queue overflowed (and says nothing) until it
    # has read half of it again, so the publisher sees the overflow, not each message after it: `dropped`
    # is a lower bound; the subscriber's seq gaps count every message.
    assert dropped <= stalled.missed
    warnings = [r.getMessage() for r in caplog.records if "too slow" in r.getMessage()]
    assert len(warnings) == 1, warnings  # rate limited


def test_dropped_over_tcp_with_a_subscriber_that_does_not_read():
    crop = bytes(32 * 1024)  # crops make messages big enough to fill the kernel's socket buffers soon
    face = {"stream": "cam1", "frame": 1, "pts": 0.04, "track": 1, "box": (0, 0, 10, 10)}
    with EventPublisher("tcp://127.0.0.1:*", sndhwm=10, include_crops=True) as publisher, \
            EventSubscriber(publisher.endpoint, rcvhwm=10) as stalled:
        deadline = time.monotonic() + 10
        while stalled.receive(20) is None:  # subscriptions reach a tcp publisher asynchronously
            assert time.monotonic() < deadline, "the subscriber never connected"
            publisher.publish(status())
        drain(stalled, 100)
        before = publisher.seq
        for _ in range(2_000):  # 64 MiB while the subscriber reads nothing
            publisher.publish(TrackStarted(**face), crop=crop)
        assert publisher.dropped > 0, "a PUB socket drops at the high-water mark without a word"
        kept = drain(stalled)
        publisher.publish(status())
        kept += drain(stalled)
    assert kept[-1] == publisher.seq and len(kept) < 2_000
    assert 0 < publisher.dropped <= stalled.missed == publisher.seq - before - len(kept)
    assert publisher.sent + publisher.dropped == publisher.seq


# ----------------------------------------------------------------------------- forged seq


@pytest.fixture
def raw_pub():
    """A plain PUB socket on an inproc endpoint: whoever holds one can put any seq on the wire."""
    endpoint = inproc()
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoint)
    yield endpoint, socket
    socket.close()


def feed(raw_pub, seqs: list[int]) -> EventSubscriber:
    endpoint, socket = raw_pub
    subscriber = EventSubscriber(endpoint)
    for seq in seqs:
        event = status(seq)
        socket.send_multipart([event.topic, event.payload()])
    assert [subscriber.receive(1000).seq for _ in seqs] == seqs
    return subscriber


FORGED = 2**62
REAL = list(range(1, 41))


@pytest.mark.parametrize(
    ("seqs", "expected"),
    [
        # (gaps, missed, restarts, resyncs, out_of_sequence, last_seq)
        pytest.param(REAL[:20] + [FORGED] + REAL[20:], (0, 0, 0, 0, 1, 40), id="one forged huge seq"),
        pytest.param(REAL[:20] + [FORGED] + REAL[22:], (1, 2, 0, 0, 1, 40), id="forged amid a real gap"),
        pytest.param(REAL[:10] + [FORGED, 5, FORGED + 7] + REAL[10:], (0, 0, 0, 0, 3, 40), id="several, one replayed"),
        pytest.param([FORGED] + REAL, (0, 0, 1, 0, 0, 40), id="forged first message"),
        pytest.param(REAL[:20] + [FORGED, FORGED + 1] + REAL[20:], (0, 0, 1, 1, 0, 40), id="two agreeing forgeries"),
        pytest.param(REAL + REAL[:10], (0, 0, 1, 0, 0, 10), id="publisher restarted"),
        pytest.param(REAL[:10] + REAL[15:], (1, 5, 0, 0, 0, 40), id="real loss still counted"),
        pytest.param(REAL[:10] + [10 + MAX_SEQ_JUMP + 1] + [11 + MAX_SEQ_JUMP + 1], (1, MAX_SEQ_JUMP, 0, 0, 0,
                     12 + MAX_SEQ_JUMP), id="the largest loss believed"),
    ],
)
def test_gap_counter_is_not_fooled_by_forged_seq(raw_pub, seqs, expected):
    with feed(raw_pub, seqs) as subscriber:
        got = (subscriber.gaps, subscriber.missed, subscriber.restarts, subscriber.resyncs,
               subscriber.out_of_sequence, subscriber.last_seq)
    assert got == expected


def test_forged_seqs_are_reported_once_and_later_gaps_still_count(raw_pub, caplog):
    caplog.set_level(logging.WARNING, logger="streamer.publish")
    seqs = []
    for seq in range(1, 201):
        seqs.append(seq)
        if seq % 10 == 0:
            seqs.append(FORGED + seq)  # a hostile peer keeps trying
    seqs += [205, 206]  # then a real loss of 4
    with feed(raw_pub, seqs) as subscriber:
        assert subscriber.out_of_sequence == 20 and subscriber.restarts == subscriber.resyncs == 0
        assert (subscriber.gaps, subscriber.missed, subscriber.last_seq) == (1, 4, 206)
        assert list(subscriber.gap_log) == [(201, 205)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(FORGED + 10) in warnings[0], warnings
