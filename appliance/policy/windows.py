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
# Layout, in int64 words: whether the day was seeded, the day (days since the epoch), its tokens, then the ring.
_SEEDED, _DAY, _DAY_TOKENS, _RING = 0, 1, 2, 3
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
    #: The seconds still in the window, oldest first: (second, requests, tokens).
    buckets: tuple[tuple[int, int, int], ...]

    def room_at(self, limit: int, tokens: bool, now: float) -> float:
        """When the window falls below ``limit`` again (requests, or tokens), as buckets leave it."""
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

    def _usage(self, now: float) -> Usage:
        v = self._v
        second = int(now)
        if v[_DAY] != int(now // DAY_S):
            v[_DAY] = int(now // DAY_S)
            v[_DAY_TOKENS] = 0
        buckets = []
        for i in range(_RING, _WORDS, 3):
            if second - WINDOW_S < v[i] <= second and (v[i + 1] or v[i + 2]):
                buckets.append((v[i], v[i + 1], v[i + 2]))
        buckets.sort()
        requests = sum(b[1] for b in buckets)
        tokens = sum(b[2] for b in buckets)
        last_request = max((b[0] for b in buckets if b[1]), default=None)
        last_token = max((b[0] for b in buckets if b[2]), default=None)
        return Usage(requests, tokens, v[_DAY_TOKENS],
                     now if last_request is None else last_request + WINDOW_S,
                     now if last_token is None else last_token + WINDOW_S, tuple(buckets))

    def _bucket(self, now: float) -> int:
        """The ring index of the current second's bucket, emptied first if it held an older second."""
        second = int(now)
        i = _RING + 3 * (second % WINDOW_S)
        if self._v[i] != second:
            self._v[i], self._v[i + 1], self._v[i + 2] = second, 0, 0
        return i

    def admit(self, now: float, accept: Callable[[Usage], bool]) -> Usage:
        """The windows now; when ``accept`` says yes to them, this request is counted in them, atomically."""
        with self._locked():
            usage = self._usage(now)
            if accept(usage):
                self._v[self._bucket(now) + 1] += 1
            return usage

    def undo(self, at: float) -> None:
        """Uncount a request admitted at ``at`` that was then refused (the host's queue was full)."""
        with self._locked():
            i = _RING + 3 * (int(at) % WINDOW_S)
            if self._v[i] == int(at) and self._v[i + 1] > 0:
                self._v[i + 1] -= 1

    def charge(self, tokens: int, now: float) -> None:
        with self._locked():
            self._usage(now)  # rolls the day over
            self._v[self._bucket(now) + 2] += tokens
            self._v[_DAY_TOKENS] += tokens


def _today() -> int:
    return int(time.time() // DAY_S)


def day_start(now: float) -> float:
    return math.floor(now / DAY_S) * DAY_S
