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
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.shared.filelock import Locked
from appliance.shared.hostload import SLOTS

WINDOW_S = 60
DAY_S = 86400
# Layout, in int64 words. The header: the day (days since the epoch) of the tokens the regions do not hold (from the
# ledger: before a reboot, or while the client had no limits), and those tokens.
_BASE_DAY, _BASE_TOKENS = 0, 1
_HEADER = 8
# A region: the newest second its ring holds, the totals of its ring, a spare word (older versions wrote a second
# there), its newest second with a token, its day and the day's tokens, its requests in flight; then the ring, 60 times
# (second, requests, tokens).
_NOW, _REQUESTS, _TOKENS, _SPARE, _LAST_TOKEN, _DAY, _DAY_TOKENS, _IN_FLIGHT = range(8)
_RING = 8
_REGION = _RING + 3 * WINDOW_S
# A region's counters, read in one call (a check reads every region in use: per word, it would cost three times more).
_COUNTERS = struct.Struct("8q")
#: ``Window.admit``'s refusals: the client has ``max_concurrent`` requests in flight; a window or the day is full.
BUSY, FULL = 0, 1
_SIZE = 8 * (_HEADER + SLOTS * _REGION)


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


class Window:
    def __init__(self, path: Path, slot: int, high: Callable[[], int], seed_day_tokens: Callable[[], int]) -> None:
        """``slot``: this worker's; ``high``: the number of slots ever claimed (the live workers' are below it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)  # sparse: only the regions in use take memory
            self._map = mmap.mmap(fd, _SIZE)
            self._v = v = memoryview(self._map).cast("q")
            self._own = _HEADER + slot * _REGION
            self._high = high
            v[self._own + _IN_FLIGHT] = 0  # a dead worker's, before this one claimed the slot
            # Once per worker start, and only here: two workers starting together must not both raise the base.
            with Locked(fd):
                today = _today()
                held = sum(v[r + _DAY_TOKENS] for r in self._regions(SLOTS) if v[r + _DAY] == today)
                base = v[_BASE_TOKENS] if v[_BASE_DAY] == today else 0
                v[_BASE_DAY], v[_BASE_TOKENS] = today, max(base, seed_day_tokens() - held)
        finally:
            os.close(fd)

    @staticmethod
    def _regions(high: int) -> range:
        return range(_HEADER, _HEADER + high * _REGION, _REGION)

    def _advance(self, second: int) -> int:
        """Move this worker's region to ``second``: the seconds that left the window leave its totals (at most 60
        steps, none within the same second). The ring index of the current second."""
        v, r = self._v, self._own
        if second > v[r + _NOW]:
            for s in range(max(v[r + _NOW] + 1, second - WINDOW_S + 1), second + 1):
                i = r + _RING + 3 * (s % WINDOW_S)
                v[r + _REQUESTS] -= v[i + 1]
                v[r + _TOKENS] -= v[i + 2]
                v[i], v[i + 1], v[i + 2] = s, 0, 0
            v[r + _NOW] = second
        # A clock set back counts in the newest second the region holds.
        return r + _RING + 3 * (v[r + _NOW] % WINDOW_S)

    def _totals(self, second: int) -> tuple[int, int, int, int, int]:
        """The window's requests and tokens over every region, the day's tokens, the newest second with a token, and
        the requests in flight."""
        v, m, counters = self._v, self._map, _COUNTERS.unpack_from
        requests = tokens = last_token = in_flight = 0
        today = second // DAY_S
        day = v[_BASE_TOKENS] if v[_BASE_DAY] == today else 0
        oldest = second - WINDOW_S
        for r in range(_HEADER, _HEADER + self._high() * _REGION, _REGION):
            held, req, tok, _, last, region_day, region_day_tokens, region_in_flight = counters(m, 8 * r)
            in_flight += region_in_flight
            if held > oldest:
                if held < second:  # a region not moved this second may hold seconds that have left the window
                    for s in range(held - WINDOW_S + 1, oldest + 1):
                        i = r + _RING + 3 * (s % WINDOW_S)
                        if v[i] == s:
                            req -= v[i + 1]
                            tok -= v[i + 2]
                requests += req
                if tok:
                    tokens += tok
                    if last > last_token:
                        last_token = last
            if region_day == today:
                day += region_day_tokens
        return requests, tokens, day, last_token, in_flight

    def admit(self, now: float, concurrent: int, requests: int, tokens: int, day: int) -> tuple[int, int, float] | int:
        """Count this request, in flight and in the window, unless the client has ``concurrent`` requests in flight
        (``BUSY``), or the window ``requests`` requests or ``tokens`` tokens, or the day ``day`` tokens (``FULL``); 0:
        no such limit. Else the window's requests (this one included) and tokens, and when its newest token leaves it.
        ``leave`` ends the request."""
        v, r = self._v, self._own
        second = int(now)
        # Within the second the region already holds (most requests), there is nothing to move.
        i = r + _RING + 3 * (second % WINDOW_S) if v[r + _NOW] == second else self._advance(second)
        used, spent, day_spent, last_token, in_flight = self._totals(second)
        if concurrent and in_flight >= concurrent:
            return BUSY
        if (requests and used >= requests) or (tokens and spent >= tokens) or (day and day_spent >= day):
            return FULL
        v[i + 1] += 1
        v[r + _REQUESTS] += 1
        v[r + _IN_FLIGHT] += 1
        return used + 1, spent, last_token + WINDOW_S if spent else now

    def leave(self) -> None:
        self._v[self._own + _IN_FLIGHT] -= 1

    def usage(self, now: float) -> Usage:
        """The windows now, all of them (to tell a refused client what and until when)."""
        v = self._v
        second = int(now)
        self._advance(second)
        used, spent, day_spent, last_token, _ = self._totals(second)
        merged: dict[int, list[int]] = {}
        last_request = 0
        for r in self._regions(self._high()):
            for i in range(r + _RING, r + _REGION, 3):
                if second - WINDOW_S < v[i] <= second and (v[i + 1] or v[i + 2]):
                    b = merged.setdefault(v[i], [0, 0])
                    b[0] += v[i + 1]
                    b[1] += v[i + 2]
                    if v[i + 1]:
                        last_request = max(last_request, v[i])
        return Usage(used, spent, day_spent, last_request + WINDOW_S if used else now,
                     last_token + WINDOW_S if spent else now, sorted((s, b[0], b[1]) for s, b in merged.items()))

    def undo(self, at: float) -> None:
        """Uncount a request admitted at ``at`` that was then refused (the host's queue was full); ``leave`` still
        ends it."""
        v, r = self._v, self._own
        i = r + _RING + 3 * (int(at) % WINDOW_S)
        if v[i] == int(at) and v[i + 1] > 0:
            v[i + 1] -= 1
            v[r + _REQUESTS] -= 1

    def charge(self, tokens: int, now: float) -> None:
        v, r = self._v, self._own
        second = int(now)
        i = r + _RING + 3 * (second % WINDOW_S) if v[r + _NOW] == second else self._advance(second)
        v[i + 2] += tokens
        v[r + _TOKENS] += tokens
        v[r + _LAST_TOKEN] = v[i]
        if v[r + _DAY] != second // DAY_S:
            v[r + _DAY], v[r + _DAY_TOKENS] = second // DAY_S, 0
        v[r + _DAY_TOKENS] += tokens


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
            if os.fstat(fd).st_size < _SIZE:
                continue
            v = memoryview(mmap.mmap(fd, _SIZE)).cast("q")
        finally:
            os.close(fd)
        for slot in slots:
            v[_HEADER + slot * _REGION + _IN_FLIGHT] = 0


def _today() -> int:
    return int(time.time() // DAY_S)


def day_start(now: float) -> float:
    return math.floor(now / DAY_S) * DAY_S
