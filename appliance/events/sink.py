"""Event sinks: an append-only JSONL file with size-based rotation, and batched POSTs to an HTTP collector.

Emission never blocks or fails a client request: ``EventSink.emit`` only puts the event on a bounded in-memory queue
and returns. A background task writes batches; when the queue is full or the collector keeps failing, events are
counted as dropped (``appliance_events_dropped_total``) instead of piling up. Several processes (gunicorn workers, the
supervisord listener) append to one file, so writes and rotation happen under an exclusive ``flock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from appliance.config import EventsConfig
from appliance.metrics.proxy import EVENTS_DROPPED

log = logging.getLogger("appliance.events")
Event = dict[str, Any]


def append_jsonl(path: Path, events: Iterable[Event], max_bytes: int, backups: int) -> None:
    """Append events as JSON lines, rotating ``path`` to ``path.1`` ... ``path.<backups>`` past ``max_bytes``."""
    append_lines(path, [orjson.dumps(e) for e in events], max_bytes, backups)


def append_lines(path: Path, lines: list[bytes], max_bytes: int, backups: int) -> None:
    """``append_jsonl`` for events already serialized."""
    data = b"\n".join(lines) + b"\n" if lines else b""
    if not data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > max_bytes:
            for i in range(backups - 1, 0, -1):
                older = path.with_name(f"{path.name}.{i}")
                if older.exists():
                    older.replace(path.with_name(f"{path.name}.{i + 1}"))
            if backups:
                path.replace(path.with_name(f"{path.name}.1"))
            else:
                path.unlink()
        _append_whole(path, data)


def _append_whole(path: Path, data: bytes) -> None:
    """Append all of ``data`` or nothing: on a full disk a partial write would leave a torn line, which the next event
    (once space is freed) would be glued to. The caller holds the lock, so no one else appends meanwhile."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


class EventSink:
    """One per process, started inside its event loop.

    Events wait in a plain list: ``emit`` runs once per request on the proxy's hot path, where an ``asyncio.Queue``
    (a wake-up of the writer per event) cost more than everything else the event needs. The writer wakes once per
    batch: when the first event arrives it waits ``flush_interval_s`` (or until ``batch_size`` events are there), then
    writes them all in one go, in a thread.
    """

    def __init__(self, cfg: EventsConfig, path: Path) -> None:
        self._cfg = cfg
        self._path = path
        #: Serialized at once: bytes are not tracked by the garbage collector, and a second of requests' events
        #: waiting as dicts made every collection walk them.
        self._pending: list[bytes] = []
        self._arrived = asyncio.Event()  # set while events are pending
        self._full = asyncio.Event()  # set while a whole batch is pending
        self._writing = False
        self._stopping = False
        self._batches: asyncio.Queue[list[bytes]] = asyncio.Queue(maxsize=max(1, cfg.queue_size // cfg.batch_size))
        self._tasks: list[asyncio.Task[None]] = []
        self._token = ""
        if cfg.token_file:
            self._token = Path(cfg.token_file).read_text(encoding="utf-8").strip()

    def emit(self, event: Event) -> None:
        pending = self._pending
        if len(pending) >= self._cfg.queue_size:
            EVENTS_DROPPED.labels("queue").inc()
            return
        pending.append(orjson.dumps(event))
        n = len(pending)
        if n == 1:
            self._arrived.set()
        if n == self._cfg.batch_size:
            self._full.set()

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._write_loop()))
        if self._cfg.url:
            self._tasks.append(asyncio.create_task(self._post_loop()))

    async def stop(self) -> None:
        """Write what is pending to the file (bounded by a short wait), then stop."""
        self._stopping = True
        self._full.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while (self._pending or self._writing) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _next_batch(self) -> list[bytes]:
        await self._arrived.wait()
        size = self._cfg.batch_size
        if len(self._pending) < size and not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._cfg.flush_interval_s):
                    await self._full.wait()
        batch = self._pending[:size]
        del self._pending[:size]
        if not self._pending:
            self._arrived.clear()
        if len(self._pending) < size and not self._stopping:
            self._full.clear()
        return batch

    async def _write_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            self._writing = True
            try:
                await asyncio.to_thread(append_lines, self._path, batch, self._cfg.max_bytes, self._cfg.backups)
            except OSError as e:
                log.warning("cannot write events to %s: %s", self._path, e)
                EVENTS_DROPPED.labels("file").inc(len(batch))
            finally:
                self._writing = False
            if self._cfg.url:
                try:
                    self._batches.put_nowait(batch)
                except asyncio.QueueFull:
                    EVENTS_DROPPED.labels("http").inc(len(batch))

    async def _post_loop(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            while True:
                batch = await self._batches.get()
                if not await self._post(session, batch):
                    EVENTS_DROPPED.labels("http").inc(len(batch))

    async def _post(self, session: aiohttp.ClientSession, batch: list[bytes]) -> bool:
        body = b"[" + b",".join(batch) + b"]"
        delay = 0.5
        for attempt in range(3):
            try:
                async with session.post(self._cfg.url, data=body, headers={"Content-Type": "application/json"}) as r:
                    if r.status < 300:
                        return True
                    if r.status < 500 and r.status != 429:
                        log.warning("collector refused %d events: HTTP %d", len(batch), r.status)
                        return False
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                log.debug("collector unreachable (attempt %d): %s", attempt + 1, e)
            await asyncio.sleep(delay)
            delay *= 2
        return False
