"""Scan slots: how many messages are scanned at once, and when a slot is given back."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from mxrules.milter.scanning import ScanSlots


@pytest.mark.parametrize(("limit", "taken"), [
    pytest.param(1, 1, id="one"),
    pytest.param(4, 4, id="default"),
])
def test_no_slot_past_the_limit(limit: int, taken: int) -> None:
    slots = ScanSlots()
    assert [slots.acquire(limit, timeout=0) for _ in range(taken)] == [True] * taken
    assert slots.acquire(limit, timeout=0) is False
    slots.release()
    assert slots.acquire(limit, timeout=0) is True
    assert slots.busy == taken


@pytest.mark.parametrize(("old", "new", "free"), [
    pytest.param(2, 3, True, id="raised-by-a-reload"),
    pytest.param(2, 1, False, id="lowered-by-a-reload"),
])
def test_the_limit_is_read_at_each_acquire(old: int, new: int, free: bool) -> None:
    slots = ScanSlots()
    assert slots.acquire(old, 0) and slots.acquire(old, 0)
    assert slots.acquire(new, timeout=0) is free


def test_slot_is_given_back_when_the_last_scanner_returns() -> None:
    slots = ScanSlots()
    assert slots.acquire(1, 0)
    futures: list[Future[object]] = [Future(), Future(), Future()]
    futures[0].set_result("spam answered before the hand-over")
    slots.release_when_done(futures)
    futures[1].set_result("virus")
    assert slots.busy == 1  # one scanner still running (past the deadline, say)
    assert futures[2].cancel()  # not started: cancelled at the deadline
    assert slots.busy == 0
    assert slots.acquire(1, 0)


def test_no_scanners_give_the_slot_back_at_once() -> None:
    slots = ScanSlots()
    assert slots.acquire(1, 0)
    slots.release_when_done([])
    assert slots.busy == 0
