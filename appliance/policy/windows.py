"""One client's request and token windows and its requests in flight, shared by every proxy worker of the host.

A file per client under ``<runtime_dir>/clients/``, mapped by every worker. Each worker slot (the one it holds in the
clients' slot table, ``appliance.shared.hostload``) has a region of its own that only its worker writes: a ring of 60
one-second buckets (the second, its requests, its tokens), their totals, the day's tokens and the requests it has in
flight. "The last 60 s" is the buckets of the 60 seconds up to now: a sliding window exact to the second. A check
adds up the regions of the slots in use, all limits in one pass; nothing takes a lock on the request path, and nothing
is ever lost to two workers writing one counter. Two workers admitting at the same instant may each let one request
past a limit, as with the models' queue bound.

The requests in flight are a worker's only while it lives: a worker zeroes its own when it claims its slot, the
gunicorn arbiter zeroes a dead worker's (``release_dead``) and every region's when the proxy starts (``reset``).

A region whose worker has been idle still holds seconds that have since left the window: the check leaves them out
(at most 59 buckets to look at, none while its worker is busy). A dead worker's region stays: its requests happened.

The file outlives reloads (new workers map the same file, so the counts go on) and lives as long as the runtime
directory. When a worker maps it (a start, a reload), the day's tokens become at least what the usage ledger holds for
today, so a daily budget also holds across restarts and reboots.

This module finds, creates and maps the files; the layout and every read and write of it are compiled
(``_requestpath.Regions``): they are on a limited client's every request.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.policy._requestpath import BUSY, DAY_S, FULL, SIZE, WINDOW_S, Regions, zero_in_flight
from appliance.shared.filelock import Locked
from appliance.shared.hostload import SLOTS

__all__ = ["BUSY", "DAY_S", "FULL", "WINDOW_S", "Usage", "Window", "client_file", "day_start", "release_dead",
           "reset"]


@dataclass(frozen=True)
class Usage:
    """A client's windows at one moment."""

    requests: int
    tokens: int
    day_tokens: int
    #: When the newest request (token) in the window leaves it: the windows are then back to their full limits.
    requests_reset_at: float
    tokens_reset_at: float
    #: The seconds in the window, oldest first: (second, requests, tokens).
    buckets: list[tuple[int, int, int]]

    def room_at(self, limit: int, tokens: bool, now: float) -> float:
        """When the window falls below ``limit`` again (requests, or tokens), as seconds leave it."""
        used = self.tokens if tokens else self.requests
        for second, requests, spent in self.buckets:
            used -= spent if tokens else requests
            if used < limit:
                return second + WINDOW_S
        return now + WINDOW_S


def client_file(directory: Path, client: str) -> Path:
    # Key names are free-form; file names must not be.
    return directory / (hashlib.sha256(client.encode()).hexdigest()[:24] + ".win")


class Window(Regions):
    """A client's file, mapped; the checks and counts are ``Regions``'s (``admit``, ``leave``, ``undo``, ``charge``)."""

    def __init__(self, path: Path, slot: int, high: Callable[[], int], seed_day_tokens: Callable[[], int]) -> None:
        """``slot``: this worker's; ``high``: the number of slots ever claimed (the live workers' are below it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)  # sparse: only the regions in use take memory
            self._map = mmap.mmap(fd, SIZE)
            super().__init__(memoryview(self._map).cast("q"), slot, high)
            # Once per worker start, and only here: two workers starting together must not both raise the base.
            with Locked(fd):
                self.raise_day_base(_today(), seed_day_tokens())
        finally:
            os.close(fd)

    def usage(self, now: float) -> Usage:
        """The windows now, all of them (to tell a refused client what and until when)."""
        requests, tokens, day_tokens, last_request, last_token, buckets = self.snapshot(now)
        return Usage(requests, tokens, day_tokens, last_request + WINDOW_S if requests else now,
                     last_token + WINDOW_S if tokens else now, buckets)


def reset(directory: Path) -> None:
    """Zero every region's requests in flight (at the arbiter's start: a previous run's are stale)."""
    _zero_in_flight(directory, range(SLOTS))


def release_dead(directory: Path, slot: int) -> None:
    """Zero a dead worker's requests in flight in every client's file (run by the arbiter)."""
    _zero_in_flight(directory, (slot,))


def _zero_in_flight(directory: Path, slots: Iterable[int]) -> None:
    for path in directory.glob("*.win"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_size < SIZE:
                continue
            words = memoryview(mmap.mmap(fd, SIZE)).cast("q")
        finally:
            os.close(fd)
        zero_in_flight(words, slots)


def _today() -> int:
    return int(time.time() // DAY_S)


def day_start(now: float) -> float:
    return math.floor(now / DAY_S) * DAY_S
