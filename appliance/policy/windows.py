"""One client's request and token windows, shared by every proxy worker of the host.

A small file per client under ``<runtime_dir>/clients/``, mapped by every worker: the day's tokens, then a ring of 60
one-second buckets (the second, its requests, its tokens). "The last 60 s" is the buckets of the 60 seconds up to
now: a sliding window exact to the second. Checks and updates take the file's lock (``lockf``): they must be atomic
across workers, and the lock costs a system call, not a round trip. Only clients with a rate or a budget pay it.

The file outlives reloads (new workers map the same file, so the counts go on) and lives as long as the runtime
directory. When a worker maps it (a start, a reload), the day's tokens become at least what the usage ledger holds for
today, so a daily budget also holds across restarts and reboots.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.shared.filelock import Locked

WINDOW_S = 60
DAY_S = 86400
# Layout, in int64 words: whether the day was seeded, the day (days since the epoch), its tokens; the newest second
# the ring holds, the window's totals and the newest second with a request (a token); then the ring, 60 times
# (second, requests, tokens). The totals are kept as seconds enter and leave, so a check reads two words.
_SEEDED, _DAY, _DAY_TOKENS, _NOW, _REQUESTS, _TOKENS, _LAST_REQUEST, _LAST_TOKEN = range(8)
_RING = 8
_WORDS = _RING + 3 * WINDOW_S
_SIZE = 8 * _WORDS


@dataclass(frozen=True)
class Usage:
    """A client's windows at one moment."""

    requests: int
    tokens: int
    day_tokens: int
    #: When the newest request (token) in the window leaves it: the windows are then back to their full limits.
    requests_reset_at: float
    tokens_reset_at: float
    #: The seconds in the window, oldest first: (second, requests, tokens); read only to tell a refused client when.
    buckets: Callable[[], list[tuple[int, int, int]]]

    def room_at(self, limit: int, tokens: bool, now: float) -> float:
        """When the window falls below ``limit`` again (requests, or tokens), as seconds leave it."""
        used = self.tokens if tokens else self.requests
        for second, requests, spent in self.buckets():
            used -= spent if tokens else requests
            if used < limit:
                return second + WINDOW_S
        return now + WINDOW_S


def client_file(directory: Path, client: str) -> Path:
    # Key names are free-form; file names must not be.
    return directory / (hashlib.sha256(client.encode()).hexdigest()[:24] + ".win")


class Window:
    def __init__(self, path: Path, seed_day_tokens: Callable[[], int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Kept open for the worker's life: it carries the lock.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        if os.fstat(self._fd).st_size < _SIZE:
            os.ftruncate(self._fd, _SIZE)
        self._v = memoryview(mmap.mmap(self._fd, _SIZE)).cast("q")
        with self._locked():
            today = _today()
            if not self._v[_SEEDED] or self._v[_DAY] != today:
                self._v[_DAY], self._v[_DAY_TOKENS], self._v[_SEEDED] = today, 0, 1
            # The ledger knows more when the client had no limits for a while (a reload took them away, and another
            # brought them back): its tokens meanwhile were not counted here.
            self._v[_DAY_TOKENS] = max(self._v[_DAY_TOKENS], seed_day_tokens())

    def _locked(self) -> Locked:
        return Locked(self._fd)

    def _advance(self, now: float) -> int:
        """Move the window to ``now``: the seconds that left it leave the totals (at most 60 steps, none within the
        same second). The ring index of the current second; under the lock."""
        v = self._v
        second = int(now)
        if second > v[_NOW]:
            for s in range(max(v[_NOW] + 1, second - WINDOW_S + 1), second + 1):
                i = _RING + 3 * (s % WINDOW_S)
                v[_REQUESTS] -= v[i + 1]
                v[_TOKENS] -= v[i + 2]
                v[i], v[i + 1], v[i + 2] = s, 0, 0
            v[_NOW] = second
            if v[_DAY] != second // DAY_S:
                v[_DAY], v[_DAY_TOKENS] = second // DAY_S, 0
        # A clock set back counts in the newest second the ring holds.
        return _RING + 3 * (v[_NOW] % WINDOW_S)

    def _buckets(self) -> list[tuple[int, int, int]]:
        v = self._v
        return sorted((v[i], v[i + 1], v[i + 2]) for i in range(_RING, _WORDS, 3) if v[i + 1] or v[i + 2])

    def admit(self, now: float, accept: Callable[[Usage], bool]) -> Usage:
        """The windows now; when ``accept`` says yes to them, this request is counted in them, atomically."""
        v = self._v
        with self._locked():
            i = self._advance(now)
            usage = Usage(v[_REQUESTS], v[_TOKENS], v[_DAY_TOKENS],
                          v[_LAST_REQUEST] + WINDOW_S if v[_REQUESTS] else now,
                          v[_LAST_TOKEN] + WINDOW_S if v[_TOKENS] else now, self._buckets)
            if accept(usage):
                v[i + 1] += 1
                v[_REQUESTS] += 1
                v[_LAST_REQUEST] = v[i]
            return usage

    def undo(self, at: float) -> None:
        """Uncount a request admitted at ``at`` that was then refused (the host's queue was full)."""
        with self._locked():
            i = _RING + 3 * (int(at) % WINDOW_S)
            if self._v[i] == int(at) and self._v[i + 1] > 0:
                self._v[i + 1] -= 1
                self._v[_REQUESTS] -= 1

    def charge(self, tokens: int, now: float) -> None:
        v = self._v
        with self._locked():
            i = self._advance(now)
            v[i + 2] += tokens
            v[_TOKENS] += tokens
            v[_LAST_TOKEN] = v[i]
            v[_DAY_TOKENS] += tokens


def _today() -> int:
    return int(time.time() // DAY_S)


def day_start(now: float) -> float:
    return math.floor(now / DAY_S) * DAY_S
