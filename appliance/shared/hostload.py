"""Requests in flight per model on this host, across every proxy worker: the bound behind ``max_queue`` (429).

llama-server queues requests beyond its slots without bound; the proxy refuses the request that would exceed
``parallel + max_queue`` instead. The count must cover all workers, so it lives in shared memory: one small file per
model under ``<runtime_dir>/inflight/``, mapped by every worker, holding one counter per worker slot. A worker only ever
writes its own slot (no lock on the request path); a check sums the slots. Two workers admitting at the same instant
can overshoot the bound by at most one request each.

A worker claims its slot with a byte-range lock on ``slots``, which the kernel drops when the worker dies however it
dies; the slot's new owner zeroes the counters, and the arbiter zeroes a dead worker's counters at once
(``release_dead``, from gunicorn's ``child_exit``) so that a killed worker's requests do not count until then.

Each model's file also holds, per slot, the number of requests ever admitted: the model manager
(``appliance.lifecycle``) sees a model's use from it, however short its requests, without a write of its own on the
request path.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from appliance.config import ApplianceConfig

SLOTS = 256
_COUNTER = struct.Struct("q")
# The slots file: the pid owning each slot, then the number of slots ever claimed (the highest claimed slot + 1), so
# that a check sums only those rather than all SLOTS.
_HIGH = SLOTS


def load_dir(cfg: ApplianceConfig) -> Path:
    return Path(cfg.supervision.runtime_dir) / "inflight"


def reset(directory: Path) -> None:
    """At arbiter start: counts from an earlier run are stale."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def _map(path: Path, size: int) -> mmap.mmap:
    # Group-readable: operators in the service's group read the counters with `appliance status`.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _read(path: Path, size: int) -> memoryview | None:
    """A shared file mapped for reading, or None while no worker has created it: a reader never creates or sizes one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size < size:
            return None
        return memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ)).cast("q")
    finally:
        os.close(fd)


def _model_file(directory: Path, model: str) -> Path:
    # Model names may hold any character; the file name must not.
    return directory / (hashlib.sha256(model.encode()).hexdigest()[:24] + ".count")


# A model's file: SLOTS in-flight counters, then SLOTS admitted-ever counters.
_MODEL_FILE_SIZE = 2 * SLOTS * _COUNTER.size


class HostLoad:
    def __init__(self, directory: Path, models: Iterable[str]) -> None:
        self._directory = directory
        self._names = tuple(models)
        self._slot = -1
        self._slots_fd = -1
        self._counts: dict[str, memoryview] = {}
        self._owners: memoryview | None = None

    def start(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        # Keep this descriptor open for the worker's life: closing any descriptor of the file drops the lock.
        self._slots_fd = os.open(self._directory / "slots", os.O_RDWR | os.O_CREAT, 0o640)
        os.ftruncate(self._slots_fd, (SLOTS + 1) * _COUNTER.size)
        for slot in range(SLOTS):
            try:
                fcntl.lockf(self._slots_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
            except OSError:
                continue
            self._slot = slot
            break
        else:
            raise RuntimeError(f"more than {SLOTS} proxy workers share {self._directory}")
        owners = self._owners = memoryview(mmap.mmap(self._slots_fd, (SLOTS + 1) * _COUNTER.size)).cast("q")
        owners[self._slot] = os.getpid()
        # Raised under a lock (a byte no slot uses): two workers starting together must not lower it.
        fcntl.lockf(self._slots_fd, fcntl.LOCK_EX, 1, SLOTS)
        owners[_HIGH] = max(owners[_HIGH], self._slot + 1)
        fcntl.lockf(self._slots_fd, fcntl.LOCK_UN, 1, SLOTS)
        for name in self._names:
            view = memoryview(_map(_model_file(self._directory, name), _MODEL_FILE_SIZE)).cast("q")
            view[self._slot] = 0
            self._counts[name] = view

    @property
    def slot(self) -> int:
        """This worker's slot (claimed by ``start``)."""
        return self._slot

    @property
    def high(self) -> int:
        """The number of slots ever claimed: the live workers' slots are below it."""
        assert self._owners is not None
        return int(self._owners[_HIGH])

    def high_reader(self) -> Callable[[], int]:
        """``high`` as a function of its own, for a check on the request path (a third of the property's cost)."""
        assert self._owners is not None
        return functools.partial(self._owners.__getitem__, _HIGH)

    def try_enter(self, model: str, limit: int) -> bool:
        """Count one more request for ``model`` unless the host already has ``limit`` in flight."""
        counts = self._counts[model]
        assert self._owners is not None
        if sum(counts[:self._owners[_HIGH]]) >= limit:
            return False
        counts[self._slot] += 1
        counts[SLOTS + self._slot] += 1
        return True

    def enter(self, model: str) -> None:
        """Count a request admitted before (``try_enter``) in flight again, after a wait that did not count."""
        counts = self._counts[model]
        counts[self._slot] += 1
        counts[SLOTS + self._slot] += 1

    def leave(self, model: str) -> None:
        self._counts[model][self._slot] -= 1


def in_flight(directory: Path, models: Iterable[str]) -> dict[str, int]:
    """Requests in flight per model on this host, counting live workers only (read by the metrics exporter).

    This is ``appliance_in_flight``: the proxy keeps these counters for the bound anyway, so a request costs no metric
    write for it."""
    models = tuple(models)
    try:
        owners = _read(directory / "slots", (SLOTS + 1) * _COUNTER.size)
        if owners is None:
            return {m: 0 for m in models}
        live = [slot for slot, pid in enumerate(owners[:SLOTS]) if pid > 0 and os.path.exists(f"/proc/{pid}")]
        totals = {}
        for model in models:
            counts = _read(_model_file(directory, model), _MODEL_FILE_SIZE)
            totals[model] = sum(counts[slot] for slot in live) if counts is not None else 0
        return totals
    except OSError:
        return {m: 0 for m in models}


def admitted(directory: Path, models: Iterable[str]) -> dict[str, int]:
    """Requests ever admitted per model since the proxy started, dead workers' included: a change means use."""
    totals = {}
    for model in models:
        try:
            counts = _read(_model_file(directory, model), _MODEL_FILE_SIZE)
        except OSError:
            counts = None
        totals[model] = sum(counts[SLOTS:]) if counts is not None else 0
    return totals


def release_dead(directory: Path, pid: int) -> int:
    """Zero the counters of the dead worker ``pid`` (run by the arbiter); its slot, or -1 when it had none."""
    try:
        slots = memoryview(_map(directory / "slots", (SLOTS + 1) * _COUNTER.size)).cast("q")
    except OSError:
        return -1
    for slot, owner in enumerate(slots[:SLOTS]):
        if owner == pid:
            slots[slot] = 0
            for path in directory.glob("*.count"):
                memoryview(_map(path, _MODEL_FILE_SIZE)).cast("q")[slot] = 0
            return slot
    return -1
