"""freeze_heap: garbage collected first, what lives frozen, a dead frozen cycle found by the next call; HeapFreezer:
a part made after the freeze is reclaimed without unfreezing the heap."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from latentsync.serving.ops.memory import HeapFreezer, freeze_heap


class Node:
    def __init__(self):
        self.other: Node | None = None


def cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


def test_freeze_collects_first_then_freezes_what_lives(unfrozen):
    garbage = cycle()
    dead = weakref.ref(garbage)
    del garbage  # unreachable, but in a cycle: only the collector frees it
    frozen = freeze_heap()
    # A frozen object is still freed when its last reference goes: a thread an earlier test left
    # running (Ray's client threads) may free a few between the two counts (CI saw 7 of 616,527).
    assert dead() is None and 0 < gc.get_freeze_count() <= frozen


def test_a_frozen_cycle_let_go_is_found_by_the_next_call(unfrozen):
    kept = cycle()
    ref = weakref.ref(kept)
    freeze_heap()
    del kept
    gc.collect()  # collections skip the permanent generation: the dead cycle is still there
    assert ref() is not None
    freeze_heap()
    assert ref() is None


def test_a_part_made_after_the_freeze_is_reclaimed_without_unfreezing_the_heap(unfrozen, monkeypatch):
    """A channel created at run time: its dead cycle is found by a collection that leaves the frozen heap alone
    (the full unfreeze-collect-freeze visits every object with the GIL held: 75-90 ms in a started server)."""
    heap = HeapFreezer()
    heap.freeze()
    made_at = time.monotonic()
    part = cycle()
    ref = weakref.ref(part)
    del part
    unfreezes: list[int] = []
    real_unfreeze = gc.unfreeze
    monkeypatch.setattr(gc, "unfreeze", lambda: unfreezes.append(1) or real_unfreeze())
    how, found = heap.release(made_at)
    assert (how, ref(), unfreezes) == ("collected", None, []) and found >= 2


def test_a_part_frozen_with_the_server_is_reclaimed_by_one_refreeze(unfrozen):
    heap = HeapFreezer()
    made_at = time.monotonic()
    part = cycle()
    ref = weakref.ref(part)
    heap.freeze()  # the part was made before: it is frozen now
    del part
    gc.collect()
    assert ref() is not None  # an ordinary collection cannot find it
    how, frozen = heap.release(made_at)
    assert how == "refrozen" and ref() is None and frozen > 0
    later = time.monotonic()
    assert heap.release(later)[0] == "collected"  # made after that refreeze: no second pause


def test_survivors_are_frozen_without_a_collection(unfrozen):
    """After start-up, with the clocks ticking: no collection (no pause), and what lives is frozen."""
    heap = HeapFreezer()
    heap.freeze()
    part = cycle()
    collections: list[int] = []
    gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "start" else None)
    try:
        frozen = heap.freeze_survivors()
    finally:
        gc.callbacks.pop()
    assert collections == [] and frozen > 0
    assert all(o is not part for o in gc.get_objects())  # out of the collected generations
    assert heap.release(time.monotonic() - 3600)[0] == "refrozen"  # a part made before it: the full way
