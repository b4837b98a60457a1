"""LruDict, and that the per-track and per-size tables built on it stay bounded the same way."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest

from streamer.detect.base import SizeCache
from streamer.lru import LruDict
from streamer.match.voting import AttributeSmoother, IdentityVoter
from streamer.track.gate import InferenceGate
from streamer.types import Attributes, Faces


def filled(capacity: int, keys: str) -> LruDict[str, int]:
    lru: LruDict[str, int] = LruDict(capacity)
    for i, key in enumerate(keys):
        lru.set(key, i)
    return lru


def keys(lru: LruDict) -> str:
    return "".join(k for k, _ in lru.items())


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "3", None, True])
def test_capacity_must_be_a_positive_integer(capacity):
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        LruDict(capacity)


@pytest.mark.parametrize(
    ("operations", "expected"),
    [
        # (calls on a dict filled with a=0, b=1, c=2 at capacity 3, keys left oldest first)
        ([], "abc"),
        ([("set", "d", 9)], "bcd"),  # the oldest goes
        ([("get", "a"), ("set", "d", 9)], "cad"),  # reading makes a recent
        ([("touch", "a"), ("set", "d", 9)], "cad"),
        ([("get_or_create", "a"), ("set", "d", 9)], "cad"),
        ([("set", "a", 5), ("set", "d", 9)], "cad"),  # replacing is a use, and evicts nothing
        ([("pop", "b"), ("set", "d", 9)], "acd"),  # room freed by pop
        ([("contains", "a"), ("set", "d", 9)], "bcd"),  # `in` does not count as a use
        ([("touch", "zz"), ("get", "zz")], "abc"),  # missing keys change nothing
    ],
)
def test_recency_decides_what_is_evicted(operations, expected):
    lru = filled(3, "abc")
    for name, *args in operations:
        if name == "contains":
            assert args[0] in lru
        elif name == "get_or_create":
            lru.get_or_create(args[0], lambda: -1)
        else:
            getattr(lru, name)(*args)
    assert keys(lru) == expected and len(lru) == len(expected)


def test_reads_return_values_and_defaults():
    lru = filled(3, "abc")
    assert lru.get("b") == 1 and lru.get("x") is None and lru.get("x", 7) == 7
    assert lru.touch("a") is True and lru.touch("x") is False
    assert lru.pop("a") == 0 and lru.pop("a") is None and lru.pop("a", -1) == -1
    assert "a" not in lru and "b" in lru and len(lru) == 2
    assert lru.capacity == 3
    lru.clear()
    assert len(lru) == 0 and lru.items() == []


def test_get_or_create_builds_once_and_not_on_failure():
    lru: LruDict[str, list] = LruDict(2)
    calls = []

    def factory() -> list:
        calls.append(1)
        return []

    first = lru.get_or_create("k", factory)
    assert lru.get_or_create("k", factory) is first and len(calls) == 1

    def broken() -> list:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        lru.get_or_create("x", broken)
    assert "x" not in lru and len(lru) == 1


def test_items_is_a_snapshot_that_allows_mutation():
    lru = filled(4, "abcd")
    for key, value in lru.items():
        if value % 2:
            lru.pop(key)
    assert keys(lru) == "ac"


def test_matches_an_ordered_dict_model_on_random_operations():
    """The reference: the OrderedDict + move_to_end + popitem code the tables used before."""
    rng = random.Random(1234)
    capacity = 5
    lru: LruDict[int, int] = LruDict(capacity)
    model: OrderedDict[int, int] = OrderedDict()
    for step in range(3000):
        key = rng.randrange(12)
        op = rng.choice(["get", "set", "pop", "touch", "get_or_create"])
        if op in ("get", "touch"):
            assert (lru.get(key) if op == "get" else lru.touch(key)) == (
                model.get(key) if op == "get" else key in model
            )
            if key in model:
                model.move_to_end(key)
        elif op == "pop":
            assert lru.pop(key) == model.pop(key, None)
        else:
            if op == "set" or key not in model:
                model[key] = step
            model.move_to_end(key)
            while len(model) > capacity:
                model.popitem(last=False)
            if op == "set":
                lru.set(key, step)
            else:
                assert lru.get_or_create(key, lambda: step) == model[key]
        assert lru.items() == list(model.items())


# -- the tables built on it ----------------------------------------------------------------------


def test_size_cache_builds_each_size_once_and_forgets_the_oldest():
    built: list[tuple[int, int]] = []

    def build(size):
        built.append(size)
        return f"model{size}"

    cache: SizeCache[str] = SizeCache(build, capacity=2)
    assert cache.get((640, 480)) == "model(640, 480)"
    cache.get((320, 240))
    cache.get((640, 480))  # cached, now the most recent
    cache.get((100, 100))  # evicts (320, 240)
    cache.get((640, 480))
    assert built == [(640, 480), (320, 240), (100, 100)] and len(cache) == 2
    cache.get((320, 240))
    assert built[-1] == (320, 240)
    cache.clear()
    assert len(cache) == 0


def test_voter_and_smoother_keep_the_recently_updated_tracks():
    voter = IdentityVoter(min_votes=1, max_tracks=2)
    smoother = AttributeSmoother(max_tracks=2)
    for track in (1, 2, 1, 3):  # track 2 is the least recently updated when 3 arrives
        voter.add(track, "alice", 0.9)
        smoother.add(track, Attributes(age=30.0))
    assert len(voter) == 2 and len(smoother) == 2
    # track 1 kept its ballot (already announced: no second announcement); track 2 starts afresh
    assert voter.add(1, "alice", 0.9) is None
    assert voter.add(2, "alice", 0.9) is not None
    assert smoother.add(1, Attributes(age=40.0)).age == pytest.approx(100.0 / 3)


def _tracked_faces(track_ids: list[int]) -> Faces:
    """One frontal 80 px face per track id, side by side."""
    boxes = np.array([[10 + 100 * i, 10, 90 + 100 * i, 90] for i in range(len(track_ids))], np.float32)
    rel = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32)
    landmarks = boxes[:, None, :2] + rel[None] * (boxes[:, None, 2:] - boxes[:, None, :2])
    return Faces(boxes=boxes, scores=np.full(len(boxes), 0.9, np.float32), landmarks=landmarks,
                 track_ids=np.array(track_ids))  # fmt: skip


def test_gate_evicts_the_track_least_recently_seen_not_one_in_the_frame():
    image = np.random.default_rng(5).integers(0, 256, (100, 500, 3), dtype=np.uint8)
    gate = InferenceGate(refresh_s=10.0, max_tracks=3)
    assert gate.select(image, _tracked_faces([1, 2, 3]), 0.0).tolist() == [0, 1, 2]
    # A new track arrives (row 0) next to known track 1: track 2 is now the least recently seen.
    assert gate.select(image, _tracked_faces([4, 1]), 0.5).tolist() == [0]
    assert len(gate) == 3
    # Tracks 1 and 3 kept their state (no refresh due yet); track 2 was forgotten, so it is new again.
    assert gate.select(image, _tracked_faces([1, 3, 2]), 1.0).tolist() == [2]
