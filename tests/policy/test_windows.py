"""A client's shared windows: exact to the second, atomic across processes, the day's tokens seeded once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from appliance.policy._requestpath import Regions, zero_in_flight
from appliance.policy.windows import BUSY, DAY_S, FULL, Window, release_dead, reset
from appliance.shared.hostload import SLOTS

T0 = 1_800_000_000.0  # a fixed moment, 20 s into a minute of the epoch's count (any works)


def window(tmp: Path, seed: int = 0, slot: int = 0) -> Window:
    return Window(tmp / "c.win", slot, lambda: 2, lambda: seed)


def test_requests_and_tokens_leave_the_window_sixty_seconds_after_their_second(tmp_path: Path) -> None:
    w = window(tmp_path)
    w.admit(T0, 0, 0, 0, 0)
    w.charge(30, T0 + 0.5)
    w.admit(T0 + 10.2, 0, 0, 0, 0)
    w.charge(5, T0 + 10.9)
    u = w.usage(T0 + 59.9)
    assert (u.requests, u.tokens) == (2, 35)
    assert u.requests_reset_at == T0 + 10 + 60 and u.tokens_reset_at == T0 + 10 + 60
    u = w.usage(T0 + 60.0)  # T0's second has left the window
    assert (u.requests, u.tokens) == (1, 5)
    u = w.usage(T0 + 130)
    assert (u.requests, u.tokens, u.requests_reset_at) == (0, 0, T0 + 130)
    assert u.day_tokens == 35  # the day keeps them


def test_room_comes_back_as_the_oldest_seconds_leave(tmp_path: Path) -> None:
    w = window(tmp_path)
    for i in range(3):
        w.admit(T0 + i, 0, 0, 0, 0)
        w.charge(10, T0 + i)
    u = w.usage(T0 + 5)
    assert u.room_at(3, False, T0 + 5) == T0 + 60  # one request must leave
    assert u.room_at(2, False, T0 + 5) == T0 + 61
    assert u.room_at(15, True, T0 + 5) == T0 + 61  # 30 tokens, under 15 once two seconds have left


def test_undo_uncounts_a_request_and_the_day_rolls_over(tmp_path: Path) -> None:
    now = time.time()  # the seed is today's
    w = window(tmp_path, seed=7)
    w.admit(now, 0, 0, 0, 0)
    w.undo(now)
    w.charge(3, now)
    u = w.usage(now)
    assert (u.requests, u.day_tokens) == (0, 7 + 3)
    tomorrow = (now // DAY_S + 1) * DAY_S
    assert w.usage(tomorrow + 1).day_tokens == 0


def test_the_day_goes_on_in_the_file_and_never_falls_below_the_ledger(tmp_path: Path) -> None:
    w = window(tmp_path, seed=100)
    now = time.time()
    w.charge(1, now)
    again = window(tmp_path, seed=50)  # another worker, or after a reload: the file's count goes on
    assert again.usage(now).day_tokens == 101
    # The ledger has more (the client had no limits for a while, its tokens then were not counted here).
    assert window(tmp_path, seed=5000).usage(now).day_tokens == 5000


def _hammer(path: str, slot: int, n: int, limit: int) -> None:
    w = Window(Path(path), slot, lambda: 2, lambda: 0)
    for _ in range(n):
        w.admit(T0, 0, limit, 0, 0)


def test_two_processes_lose_no_count_and_pass_a_limit_by_one_at_most(tmp_path: Path) -> None:
    path = tmp_path / "c.win"
    window(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(path), slot, 300, 450)) for slot in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    # Each counts in its own region, so nothing is lost; at the same instant each may let one past the limit.
    assert 450 <= window(tmp_path).usage(T0).requests <= 452


def test_admit_refuses_at_each_limit_and_counts_nothing_then(tmp_path: Path) -> None:
    w = window(tmp_path)
    now = time.time()
    assert w.admit(now, 0, 2, 0, 0) == (1, 0, now)
    w.charge(10, now)
    assert w.admit(now, 0, 2, 0, 0) == (2, 10, int(now) + 60)
    assert w.admit(now, 0, 2, 0, 0) == FULL  # the request window is full
    assert w.admit(now, 0, 0, 10, 0) == FULL  # the token window is full: post-paid, 10 of 10 used
    assert w.admit(now, 0, 0, 0, 10) == FULL  # so is the day's budget
    assert w.usage(now).requests == 2


def test_each_worker_sees_the_others_requests_until_they_leave_the_window(tmp_path: Path) -> None:
    busy, idle = window(tmp_path, slot=0), window(tmp_path, slot=1)
    for i in range(3):
        idle.admit(T0 + i, 0, 0, 0, 0)
    idle.charge(9, T0 + 2)
    assert busy.admit(T0 + 30, 0, 4, 0, 0) == (4, 9, T0 + 2 + 60)  # three of the idle worker's, and this one
    assert busy.admit(T0 + 30, 0, 4, 0, 0) == FULL
    u = busy.usage(T0 + 60.5)  # the idle worker's first second has left; its region was not touched since
    assert (u.requests, u.tokens) == (3, 9) and u.buckets == [(T0 + 1, 1, 0), (T0 + 2, 1, 9), (T0 + 30, 1, 0)]


def test_the_ledgers_count_is_not_added_twice_to_what_the_regions_hold(tmp_path: Path) -> None:
    now = time.time()
    w = window(tmp_path)
    w.charge(40, now)
    # The ledger has written those 40 and knows of 60 more (before a reboot, say): 100 in all, not 140.
    assert window(tmp_path, seed=100, slot=1).usage(now).day_tokens == 100


def test_requests_in_flight_count_across_workers_until_they_leave_or_their_worker_dies(tmp_path: Path) -> None:
    one, two = window(tmp_path, slot=0), window(tmp_path, slot=1)
    now = time.time()
    assert one.admit(now, 2, 0, 0, 0) == (1, 0, now)
    assert two.admit(now, 2, 0, 0, 0) == (2, 0, now)
    assert one.admit(now, 2, 0, 0, 0) == BUSY  # refused at once, and not counted in the window
    assert one.usage(now).requests == 2
    one.leave()
    assert two.admit(now, 2, 0, 0, 0) == (3, 0, now)
    release_dead(tmp_path, 1)  # worker two died with its two requests in flight: the arbiter frees them
    assert one.admit(now, 2, 0, 0, 0) == (4, 0, now)
    assert one.admit(now, 2, 0, 0, 0) == (5, 0, now)
    assert one.admit(now, 2, 0, 0, 0) == BUSY
    reset(tmp_path)  # a new run of the proxy
    assert window(tmp_path, slot=1).admit(now, 1, 0, 0, 0) == (6, 0, now)


def test_a_new_worker_in_a_slot_starts_with_nothing_in_flight(tmp_path: Path) -> None:
    now = time.time()
    w = window(tmp_path)
    w.admit(now, 1, 0, 0, 0)
    assert window(tmp_path).admit(now, 1, 0, 0, 0) == (2, 0, now)  # the slot's new owner: the old one is gone


def test_what_the_compiled_checks_would_index_unchecked_is_refused_up_front(tmp_path: Path) -> None:
    # _requestpath.pyx reads and writes the file without bounds checks on the request path: a slot outside the file,
    # or a file too short, is refused once, when it is mapped.
    with pytest.raises(ValueError, match=f"slot {SLOTS} of a"):
        window(tmp_path, slot=SLOTS)
    short = memoryview(bytearray(8 * 64)).cast("q")
    with pytest.raises(ValueError, match="slot 0 of a 64-word windows file"):
        Regions(short, 0, lambda: 1)
    with pytest.raises(ValueError, match="slot 0 of a 64-word windows file"):
        zero_in_flight(short, [0])
    # A high mark above the slots a file has is read as all of them.
    w = Window(tmp_path / "d.win", 0, lambda: SLOTS + 5, lambda: 0)
    assert w.admit(T0, 1, 0, 0, 0) == (1, 0, T0)
    assert w.admit(T0, 1, 0, 0, 0) == BUSY
