"""A client's shared windows: exact to the second, atomic across processes, the day's tokens seeded once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from appliance.policy.windows import DAY_S, Usage, Window

T0 = 1_800_000_000.0  # a fixed moment, 20 s into a minute of the epoch's count (any works)


def window(tmp: Path, seed: int = 0) -> Window:
    return Window(tmp / "c.win", lambda: seed)


def always(_: Usage) -> bool:
    return True


def test_requests_and_tokens_leave_the_window_sixty_seconds_after_their_second(tmp_path: Path) -> None:
    w = window(tmp_path)
    w.admit(T0, always)
    w.charge(30, T0 + 0.5)
    w.admit(T0 + 10.2, always)
    w.charge(5, T0 + 10.9)
    u = w.admit(T0 + 59.9, lambda _: False)  # looked at, not counted
    assert (u.requests, u.tokens) == (2, 35)
    assert u.requests_reset_at == T0 + 10 + 60 and u.tokens_reset_at == T0 + 10 + 60
    u = w.admit(T0 + 60.0, lambda _: False)  # T0's second has left the window
    assert (u.requests, u.tokens) == (1, 5)
    u = w.admit(T0 + 130, lambda _: False)
    assert (u.requests, u.tokens, u.requests_reset_at) == (0, 0, T0 + 130)
    assert u.day_tokens == 35  # the day keeps them


def test_room_comes_back_as_the_oldest_seconds_leave(tmp_path: Path) -> None:
    w = window(tmp_path)
    for i in range(3):
        w.admit(T0 + i, always)
        w.charge(10, T0 + i)
    u = w.admit(T0 + 5, lambda _: False)
    assert u.room_at(3, False, T0 + 5) == T0 + 60  # one request must leave
    assert u.room_at(2, False, T0 + 5) == T0 + 61
    assert u.room_at(15, True, T0 + 5) == T0 + 61  # 30 tokens, under 15 once two seconds have left


def test_undo_uncounts_a_request_and_the_day_rolls_over(tmp_path: Path) -> None:
    now = time.time()  # the seed is today's
    w = window(tmp_path, seed=7)
    w.admit(now, always)
    w.undo(now)
    w.charge(3, now)
    u = w.admit(now, lambda _: False)
    assert (u.requests, u.day_tokens) == (0, 7 + 3)
    tomorrow = (now // DAY_S + 1) * DAY_S
    assert w.admit(tomorrow + 1, lambda _: False).day_tokens == 0


def test_the_day_goes_on_in_the_file_and_never_falls_below_the_ledger(tmp_path: Path) -> None:
    w = window(tmp_path, seed=100)
    now = time.time()
    w.charge(1, now)
    again = window(tmp_path, seed=50)  # another worker, or after a reload: the file's count goes on
    assert again.admit(now, lambda _: False).day_tokens == 101
    # The ledger has more (the client had no limits for a while, its tokens then were not counted here).
    assert window(tmp_path, seed=5000).admit(now, lambda _: False).day_tokens == 5000


def _hammer(path: str, n: int, limit: int) -> None:
    w = Window(Path(path), lambda: 0)
    for _ in range(n):
        w.admit(T0, lambda u: u.requests < limit)


def test_two_processes_never_admit_past_a_limit(tmp_path: Path) -> None:
    path = tmp_path / "c.win"
    window(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(path), 300, 450)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert window(tmp_path).admit(T0, lambda _: False).requests == 450
