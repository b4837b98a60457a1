"""DynamicBatcher: when a batch is due, what one batch holds, and in which order requests leave."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from streamer.pipeline.batching import DynamicBatcher


@dataclass
class Request:
    """The two attributes the batcher reads (PendingRequest's header and arrays do not matter to it)."""

    faces: int
    arrived: float
    name: str = ""


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def batcher(max_batch: int = 8, max_wait_s: float = 0.5, now: float = 100.0) -> tuple[DynamicBatcher, FakeClock]:
    clock = FakeClock(now)
    return DynamicBatcher(max_batch, max_wait_s, clock=clock), clock


def names(requests: list) -> list[str]:
    return [r.name for r in requests]


@pytest.mark.parametrize(
    ("max_batch", "max_wait_s", "error"),
    [
        (0, 0.1, "max_batch must be >= 1, got 0"),
        (-3, 0.1, "max_batch must be >= 1, got -3"),
        (4, -0.001, "max_wait_s must be >= 0, got -0.001"),
    ],
)
def test_invalid_settings_raise(max_batch, max_wait_s, error):
    with pytest.raises(ValueError, match=error):
        DynamicBatcher(max_batch, max_wait_s)


def test_zero_wait_is_allowed_and_flushes_at_once():
    b, clock = batcher(max_wait_s=0.0)
    b.add(Request(1, clock.now))
    assert b.seconds_until_due() == 0.0 and b.due()


def test_empty_batcher_is_never_due():
    b, _ = batcher()
    assert b.seconds_until_due() is None and not b.due() and len(b) == 0 and b.requests == 0


@pytest.mark.parametrize(
    ("sizes", "due"),
    [
        ([3], False),
        ([3, 4], False),
        ([3, 5], True),  # exactly max_batch faces
        ([3, 6], True),  # more than max_batch queued
        ([8], True),
        ([12], True),  # one request alone larger than a batch
    ],
)
def test_due_as_soon_as_max_batch_faces_are_queued(sizes, due):
    b, clock = batcher(max_batch=8)
    for i, n in enumerate(sizes):
        b.add(Request(n, clock.now, f"r{i}"))
    assert len(b) == sum(sizes) and b.requests == len(sizes)
    assert b.due() is due  # no time has passed: only the face count can make it due
    assert b.seconds_until_due() == (0.0 if due else 0.5)


def test_wait_counts_down_and_flips_exactly_at_the_deadline():
    b, clock = batcher(max_batch=8, max_wait_s=0.5, now=100.0)
    b.add(Request(2, 100.0, "first"))
    # binary fractions, so the arithmetic is exact at the edge
    for now, left in [(100.0, 0.5), (100.25, 0.25), (100.375, 0.125)]:
        clock.now = now
        assert b.seconds_until_due() == left and not b.due()
    clock.now = 100.5
    assert b.seconds_until_due() == 0.0 and b.due()
    clock.now = 107.0  # long overdue: never negative
    assert b.seconds_until_due() == 0.0 and b.due()


def test_deadline_follows_the_oldest_request():
    b, clock = batcher(max_batch=8, max_wait_s=0.5, now=100.0)
    b.add(Request(1, 100.0, "old"))
    clock.now = 100.25
    b.add(Request(1, 100.25, "new"))
    assert b.seconds_until_due() == 0.25  # from "old", not "new"
    clock.now = 100.5
    assert b.due()
    assert names(b.take()) == ["old", "new"]
    assert b.seconds_until_due() is None


@pytest.mark.parametrize(
    ("sizes", "batches"),
    [
        # max_batch 8: each take() returns the oldest requests whose faces fit, at least one
        ([3, 4, 2], [["r0", "r1"], ["r2"]]),
        ([4, 4, 4], [["r0", "r1"], ["r2"]]),
        ([12], [["r0"]]),  # larger than a batch: taken alone, whole
        ([1, 12, 1], [["r0"], ["r1"], ["r2"]]),  # the big one waits its turn, then goes alone
        ([12, 1], [["r0"], ["r1"]]),
        ([0, 8, 0], [["r0", "r1", "r2"]]),  # zero-face requests ride along
        ([2, 2, 2, 2, 2], [["r0", "r1", "r2", "r3"], ["r4"]]),
    ],
)
def test_take_is_fifo_never_splits_and_respects_max_batch(sizes, batches):
    b, clock = batcher(max_batch=8)
    requests = [Request(n, clock.now, f"r{i}") for i, n in enumerate(sizes)]
    for r in requests:
        b.add(r)
    taken = []
    while b.requests:
        batch = b.take()
        assert batch, "take() on a non-empty batcher returns at least one request"
        assert len(batch) == 1 or sum(r.faces for r in batch) <= 8
        taken.append(batch)
    assert [names(batch) for batch in taken] == batches
    # the very same objects, each once, in arrival order: nothing split or copied
    flat = [r for batch in taken for r in batch]
    assert len(flat) == len(requests) and all(out is sent for out, sent in zip(flat, requests))
    assert len(b) == 0


def test_len_counts_queued_faces_through_adds_and_takes():
    b, clock = batcher(max_batch=5)
    counts = []
    for n in (2, 3, 4):
        b.add(Request(n, clock.now))
        counts.append(len(b))
    b.take()  # 2 + 3
    counts.append(len(b))
    b.take()
    counts.append(len(b))
    assert counts == [2, 5, 9, 4, 0]
    assert b.take() == []  # nothing queued: nothing taken
