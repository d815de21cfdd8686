"""Fair sharing of a busy model's slots between clients: the host-wide admission queue.

llama-server serves ``parallel`` requests at once and queues the rest first come, first served: a client that sends 50
requests makes everyone else wait behind all 50. The proxy keeps the requests beyond ``parallel`` itself and hands
each freed slot to the waiting request with the smallest start tag, in start-time fair queuing: a request starts at
``max(virtual clock, its client's finish tag)``, its client's finish tag moves ``1 / weight`` past that, and the clock
moves to each admitted start tag (ties go to the earlier request). Clients take turns, each ``weight`` times as often
as a client of weight 1; a client sending one request starts at the clock, ahead of the flood's next request, so it
waits for the next free slot, not for the flood.

Every proxy worker shares one file per model under ``<runtime_dir>/admission/``: the virtual clock, each worker's
running count, the clients' finish tags, and the waiting requests. Changes take the file's lock. A freed slot is granted
under the lock by the worker that frees it, which then wakes the waiter's worker through that worker's FIFO; each
waiter also looks again every ``RECHECK_S``, should a wake-up be lost. While nothing waits and a slot is free, a
request runs at once without the lock (two workers doing so at the same instant may run one request each over
``parallel``: llama-server queues it, as before). A dead worker's running count and waiters are dropped by the arbiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.shared.filelock import Locked

RECHECK_S = 0.25
SLOTS = 256  # as many as the in-flight counters' worker slots (appliance.shared.hostload)
CLIENTS = 512  # the clients' finish tags: an open-addressing table keyed by a hash of the name
WAITERS = 4096
SCALE = 1_000_000  # tags are integers: 1 / weight in millionths

# Layout in int64 words. _WAITING counts the queue's entries, _GRANTED those granted a slot whose worker has not yet
# taken it: they count as running.
_CLOCK, _WAITING, _SEQ, _GRANTED = 0, 1, 2, 3
_RUNNING = 8
_CLIENT = _RUNNING + SLOTS
_WAITER = _CLIENT + 2 * CLIENTS
_WAITER_WORDS = 4  # start tag, seq, worker slot + 1, granted
_WORDS = _WAITER + _WAITER_WORDS * WAITERS
_SIZE = 8 * _WORDS


def admission_dir(cfg: ApplianceConfig) -> Path:
    return Path(cfg.supervision.runtime_dir) / "admission"


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True) or 1


def model_file(directory: Path, model: str) -> Path:
    return directory / (hashlib.sha256(model.encode()).hexdigest()[:24] + ".queue")


def fifo(directory: Path, slot: int) -> Path:
    return directory / f"worker-{slot}.fifo"


def reset(directory: Path) -> None:
    """At arbiter start: waiters and running counts from an earlier run are stale."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def _map(path: Path) -> tuple[int, memoryview]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    if os.fstat(fd).st_size < _SIZE:
        os.ftruncate(fd, _SIZE)
    return fd, memoryview(mmap.mmap(fd, _SIZE)).cast("q")


class _Model:
    """One model's shared queue file, mapped."""

    def __init__(self, path: Path, parallel: int) -> None:
        self.fd, self.v = _map(path)
        self.parallel = parallel

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return Locked(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def running(self, high: int) -> int:
        return sum(self.v[_RUNNING:_RUNNING + high]) + self.v[_GRANTED]

    def _waiter(self, i: int) -> int:
        return _WAITER + _WAITER_WORDS * i

    def find(self, seq: int) -> int:
        v = self.v
        for i in range(v[_WAITING]):
            if v[self._waiter(i) + 1] == seq:
                return i
        return -1

    def remove(self, i: int) -> None:
        """Drop entry ``i`` (a granted one gives its slot back); the last one moves into its place."""
        v = self.v
        if v[self._waiter(i) + 3]:
            v[_GRANTED] -= 1
        last = v[_WAITING] - 1
        a, b = self._waiter(i), self._waiter(last)
        v[a:a + _WAITER_WORDS] = v[b:b + _WAITER_WORDS]
        v[_WAITING] = last

    def grant(self, high: int) -> set[int]:
        """Hand free slots to the waiters with the smallest tags; the worker slots to wake."""
        v = self.v
        woken: set[int] = set()
        while self.running(high) < self.parallel:
            best = -1
            for i in range(v[_WAITING]):
                w = self._waiter(i)
                if not v[w + 3]:
                    b = self._waiter(best)
                    if best < 0 or (v[w], v[w + 1]) < (v[b], v[b + 1]):
                        best = i
            if best < 0:
                break
            w = self._waiter(best)
            v[w + 3] = 1
            v[_GRANTED] += 1
            v[_CLOCK] = max(v[_CLOCK], v[w])
            woken.add(v[w + 2] - 1)
        return woken

    def finish_tag(self, client: int) -> int:
        """The index of the client's finish tag in the table (its entry claimed if new)."""
        v = self.v
        i = client % CLIENTS
        for _ in range(CLIENTS):
            at = _CLIENT + 2 * i
            if v[at] in (0, client):
                v[at] = client
                return at + 1
            i = (i + 1) % CLIENTS
        # Full (more than CLIENTS clients since the proxy started): the oldest share one entry; tags stay ordered.
        return _CLIENT + 2 * (client % CLIENTS) + 1


class Ticket:
    """A request's place: it runs (holds one of the model's slots) once ``ready`` is done."""

    __slots__ = ("model", "ready", "seq", "waited_s")

    def __init__(self, model: str, seq: int, ready: asyncio.Future[None] | None) -> None:
        self.model = model
        self.seq = seq
        self.ready = ready
        self.waited_s = 0.0


class FairShare:
    def __init__(self, directory: Path, parallel: dict[str, int], slot: Callable[[], int],
                 high: Callable[[], int]) -> None:
        """``slot`` and ``high``: this worker's slot and the number of slots ever claimed, as the in-flight counters
        (``HostLoad``) have them: both count the same workers."""
        self._directory = directory
        self._parallel = parallel
        self._slot = slot
        self._high = high
        self._models: dict[str, _Model] = {}
        self._clients: dict[str, int] = {}
        #: This worker's waiting tickets by their sequence number.
        self._waiting: dict[int, Ticket] = {}
        self._fifo = -1

    def start(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        slot = self._slot()
        for name, parallel in self._parallel.items():
            m = self._models[name] = _Model(model_file(self._directory, name), parallel)
            with m.lock():  # a new owner of the slot: what an earlier one left is not ours
                m.v[_RUNNING + slot] = 0
                for i in reversed(range(m.v[_WAITING])):
                    if m.v[m._waiter(i) + 2] == slot + 1:
                        m.remove(i)
        path = fifo(self._directory, slot)
        with contextlib.suppress(FileExistsError):
            os.mkfifo(path, 0o640)
        # Read and write: a FIFO with no writer left reads end-of-file for ever, which would wake the loop in vain.
        self._fifo = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(self._fifo, self._woken)

    def stop(self) -> None:
        if self._fifo >= 0:
            asyncio.get_running_loop().remove_reader(self._fifo)
            os.close(self._fifo)
            self._fifo = -1

    def _client(self, name: str) -> int:
        key = self._clients.get(name)
        if key is None:
            key = self._clients[name] = _digest(name)
        return key

    def enter(self, model: str, client: str, weight: float) -> Ticket:
        """Take a slot of ``model`` now, or a place in its queue (then await ``ticket.ready``)."""
        m = self._models[model]
        v = m.v
        high = self._high()
        slot = self._slot()
        if not v[_WAITING] and m.running(high) < m.parallel:
            v[_RUNNING + slot] += 1
            return Ticket(model, 0, None)
        with m.lock():
            if not v[_WAITING] and m.running(high) < m.parallel:
                v[_RUNNING + slot] += 1
                return Ticket(model, 0, None)
            if v[_WAITING] >= WAITERS:
                # Beyond any max_queue a config can set in practice: llama-server queues it, as before.
                v[_RUNNING + slot] += 1
                return Ticket(model, 0, None)
            at = m.finish_tag(self._client(client))
            tag = max(v[_CLOCK], v[at])
            v[at] = tag + max(1, round(SCALE / weight))
            v[_SEQ] += 1
            seq = v[_SEQ]
            w = m._waiter(v[_WAITING])
            v[w], v[w + 1], v[w + 2], v[w + 3] = tag, seq, slot + 1, 0
            v[_WAITING] += 1
        ticket = Ticket(model, seq, asyncio.get_running_loop().create_future())
        self._waiting[seq] = ticket
        return ticket

    async def wait(self, ticket: Ticket, gone: asyncio.Future[None]) -> bool:
        """Until the ticket's slot is granted (True), or ``gone`` is done first (False: the place is given up)."""
        if ticket.ready is None:
            return True
        t0 = time.perf_counter()
        try:
            while not ticket.ready.done():
                if gone.done():
                    return False
                done, _ = await asyncio.wait((ticket.ready, gone), timeout=RECHECK_S,
                                            return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    self._collect(ticket.model)
            return True
        finally:
            ticket.waited_s = time.perf_counter() - t0

    def leave(self, ticket: Ticket) -> None:
        """The request is over, or gave up its place: free what it holds, and grant the slot to the next waiter."""
        m = self._models[ticket.model]
        if ticket.ready is None or ticket.ready.done():
            m.v[_RUNNING + self._slot()] -= 1
            if not m.v[_WAITING]:
                # Nothing to hand over: no lock. A request queued just now, having seen this slot still busy, finds
                # it free at its next look (RECHECK_S).
                return
        woken: set[int] = set()
        with m.lock():
            if ticket.ready is not None and not ticket.ready.done():
                # Still in the queue (perhaps granted, not yet taken): leaving it frees a granted slot too.
                self._waiting.pop(ticket.seq, None)
                i = m.find(ticket.seq)
                if i >= 0:
                    m.remove(i)
            if m.v[_WAITING]:
                woken = m.grant(self._high())
        self._wake(woken)

    def _wake(self, slots: Iterable[int]) -> None:
        mine = self._slot()
        for slot in slots:
            if slot == mine:
                self._collect_all()
                continue
            _poke(self._directory, slot)

    def _woken(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._fifo, 4096)
        self._collect_all()

    def _collect_all(self) -> None:
        for model in {t.model for t in self._waiting.values()}:
            self._collect(model)

    def _collect(self, model: str) -> None:
        """Grant what is free, and start this worker's waiters of ``model`` whose slots were granted."""
        m = self._models[model]
        slot, high = self._slot(), self._high()
        woken: set[int] = set()
        with m.lock():
            for _ in range(2):  # a second pass only if a granted entry had no ticket left here
                if m.v[_WAITING] and m.running(high) < m.parallel:
                    woken |= m.grant(high)
                dropped = False
                for i in reversed(range(m.v[_WAITING])):
                    w = m._waiter(i)
                    if m.v[w + 2] == slot + 1 and m.v[w + 3]:
                        ticket = self._waiting.pop(m.v[w + 1], None)
                        m.remove(i)
                        if ticket is None or ticket.ready is None:
                            dropped = True
                            continue
                        # The granted slot becomes this worker's running request (only this worker writes its count).
                        m.v[_RUNNING + slot] += 1
                        ticket.ready.set_result(None)
                if not dropped:
                    break
        self._wake_later(woken, slot)

    def _wake_later(self, slots: set[int], mine: int) -> None:
        others = slots - {mine}
        if others:
            asyncio.get_running_loop().call_soon(self._wake, others)


def _poke(directory: Path, slot: int) -> None:
    """Wake worker ``slot``. Gone (no reader): the arbiter drops its places; full: a wake-up is already pending."""
    try:
        fd = os.open(fifo(directory, slot), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.write(fd, b"!")
    os.close(fd)


def release_dead(directory: Path, slot: int, parallel: dict[str, int]) -> None:
    """A dead worker's running requests and places are dropped, and the slots it held granted (run by the arbiter)."""
    for name, n in parallel.items():
        path = model_file(directory, name)
        if not path.exists():
            continue
        m = _Model(path, n)
        try:
            with m.lock():
                m.v[_RUNNING + slot] = 0
                for i in reversed(range(m.v[_WAITING])):
                    if m.v[m._waiter(i) + 2] == slot + 1:
                        m.remove(i)
                woken = m.grant(SLOTS)
        finally:
            m.close()
        for owner in woken:
            _poke(directory, owner)


def waiting(directory: Path, models: Iterable[str]) -> dict[str, int]:
    """Requests waiting for a slot per model on this host (read by the metrics exporter and ``appliance status``)."""
    out = {}
    for name in models:
        try:
            fd = os.open(model_file(directory, name), os.O_RDONLY)
        except OSError:
            out[name] = 0
            continue
        try:
            if os.fstat(fd).st_size < _SIZE:
                out[name] = 0
                continue
            with mmap.mmap(fd, 8 * (_WAITING + 1), prot=mmap.PROT_READ) as mm:
                out[name] = int.from_bytes(mm[8 * _WAITING:8 * (_WAITING + 1)], "little", signed=True)
        finally:
            os.close(fd)
    return out
