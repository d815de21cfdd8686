"""The usage ledger: requests and tokens per UTC hour, client and model, in one SQLite file that outlives restarts,
reloads and upgrades.

Every proxy worker process has one ``UsageRecorder``. The request path only adds up in memory; a background task
writes what was added about once a second, in one transaction, in a thread. Several workers write the same file: WAL
mode lets them (and readers such as ``appliance usage``) work side by side, and the busy timeout makes a writer wait
for another instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig
from appliance.metrics import proxy as metrics
from appliance.usage import GROUP_FIELDS

log = logging.getLogger("appliance.usage")

FILE_NAME = "usage.sqlite3"
#: ``PRAGMA user_version`` of the schema below; a newer file (a downgrade) is refused rather than misread.
SCHEMA_VERSION = 1
FLUSH_INTERVAL_S = 1.0
#: How long a writer waits for another process's transaction before the flush counts as failed (and is retried).
BUSY_TIMEOUT_S = 10.0
#: Counts kept in memory while the file cannot be written: this many distinct hours, the oldest dropped first.
MAX_PENDING_HOURS = 48

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL,  -- unix time of the start of the UTC hour
    client TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (hour, client, model)
)
"""
_UPSERT = """
INSERT INTO usage (hour, client, model, requests, prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT(hour, client, model) DO UPDATE SET requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""
# SQL for each group field; the report's day and hour are UTC, as ISO 8601 text (which also sorts by time).
_GROUP_SQL = {"client": "client", "model": "model", "day": "strftime('%Y-%m-%d', hour, 'unixepoch')",
              "hour": "strftime('%Y-%m-%dT%H:00Z', hour, 'unixepoch')"}
_ORDER = ("day", "hour", "client", "model")

#: (hour, client, model) -> [requests, prompt tokens, completion tokens]
Pending = dict[tuple[int, str, str], list[int]]


class LedgerError(Exception):
    """The ledger file exists but cannot be read: the message names the path and the reason."""


def ledger_path(cfg: ApplianceConfig) -> Path:
    return Path(cfg.supervision.state_dir) / FILE_NAME


def hour_of(t: float) -> int:
    """The start of the UTC hour that ``t`` (unix time) falls in."""
    return int(t // 3600) * 3600


def _open_for_writing(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except FileExistsError:  # with exist_ok: something that is not a directory, which "File exists" would hide
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        pass
    else:
        # Group-readable whatever the umask, so operators in the service's group can run `appliance usage`; SQLite
        # gives the -wal and -shm files the database file's mode.
        os.fchmod(fd, 0o640)
        os.close(fd)
    # Autocommit mode: transactions are begun explicitly with BEGIN IMMEDIATE, which takes the write lock up front
    # (waiting up to the busy timeout), so a transaction never has to be retried halfway.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL could not be set")
        conn.execute("PRAGMA synchronous=NORMAL")
        with _transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version} is newer than this appliance's "
                                            f"{SCHEMA_VERSION}")
            if version < SCHEMA_VERSION:
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # some errors (a full disk) have rolled it back already
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _write(conn: sqlite3.Connection, batch: Pending) -> None:
    with _transaction(conn):
        conn.executemany(_UPSERT, [(*key, *counts) for key, counts in batch.items()])


def _merge(into: Pending, batch: Pending) -> None:
    for key, (requests, prompt, completion) in batch.items():
        counts = into.get(key)
        if counts is None:
            into[key] = [requests, prompt, completion]
        else:
            counts[0] += requests
            counts[1] += prompt
            counts[2] += completion


class UsageRecorder:
    """One per proxy worker process: ``record`` per request; ``start`` and ``stop`` with the worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: Pending = {}
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Set while writes fail, so a failing disk logs one warning, not one a second.
        self._failing = False

    def record(self, client: str, model: str, prompt: int, completion: int, now: float | None = None) -> None:
        """One request forwarded to ``model`` and its tokens. No I/O: written at the next flush."""
        key = (hour_of(time.time() if now is None else now), client, model)
        counts = self._pending.get(key)
        if counts is None:
            self._pending[key] = [1, prompt, completion]
        else:
            counts[0] += 1
            counts[1] += prompt
            counts[2] += completion
        if prompt > 0:
            metrics.add(metrics.TOKENS, prompt, client, model, "prompt")
        if completion > 0:
            metrics.add(metrics.TOKENS, completion, client, model, "completion")

    async def start(self) -> None:
        """Open (or create) the file and start writing once a second; a file that cannot be opened is retried then."""
        try:
            self._conn = await asyncio.to_thread(_open_for_writing, self.path)
        except (OSError, sqlite3.Error) as e:
            self._warn(e)
        self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def stop(self) -> None:
        """Stop the background task, write what is left, and close the file."""
        self._stopping.set()
        if self._task is not None:
            # Not Task.cancel(): a cancelled await would leave its write running in the thread, racing the last one.
            await self._task
            self._task = None
        await self.flush()
        if self._pending:
            requests = sum(c[0] for c in self._pending.values())
            log.warning("usage ledger %s: the usage of %d request(s) could not be written and is lost", self.path,
                        requests)
            self._pending = {}
        if self._conn is not None:
            await asyncio.to_thread(self._conn.close)
            self._conn = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), FLUSH_INTERVAL_S)
            if self._stopping.is_set():
                return
            await self.flush()

    async def flush(self) -> None:
        """Write what was recorded since the last flush, in one transaction, in a thread; on failure keep it."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await asyncio.to_thread(self._write, batch)
        except Exception as e:  # whatever it is, the request path and the worker carry on
            self._warn(e)
            # Requests recorded during the write were added to the new dict: add the batch back to it.
            _merge(self._pending, batch)
            self._bound()
            return
        if self._failing:
            self._failing = False
            log.warning("usage ledger %s: written again", self.path)

    def _write(self, batch: Pending) -> None:
        if self._conn is None:
            self._conn = _open_for_writing(self.path)
        try:
            _write(self._conn, batch)
        except BaseException:
            # Reopened at the next flush: a file replaced or repaired meanwhile is then picked up.
            self._conn.close()
            self._conn = None
            raise

    def _warn(self, e: BaseException) -> None:
        if not self._failing:
            self._failing = True
            log.warning("usage ledger %s cannot be written (%s); keeping the counts in memory and retrying every "
                        "%g s", self.path, e, FLUSH_INTERVAL_S)

    def _bound(self) -> None:
        hours = sorted({hour for hour, _, _ in self._pending})
        if len(hours) <= MAX_PENDING_HOURS:
            return
        dropped = set(hours[:-MAX_PENDING_HOURS])
        lost = [key for key in self._pending if key[0] in dropped]
        requests = sum(self._pending.pop(key)[0] for key in lost)
        log.warning("usage ledger %s: still not writable; dropped the usage of %d request(s) in the oldest %d hour(s) "
                    "(more than %d hours are not kept in memory)", self.path, requests, len(dropped),
                    MAX_PENDING_HOURS)


# Reading: never creates the file, never writes it.


def _read(path: Path, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
    """The rows of ``sql``; [] for a ledger whose schema was not created yet. LedgerError when unreadable."""
    quoted = urllib.parse.quote(str(path.resolve()))
    try:
        try:
            conn = sqlite3.connect(f"file:{quoted}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.OperationalError:
            # A reader without write access to the directory cannot create the -shm file that WAL mode needs; when
            # it does not exist, no writer has the file open, so reading it as immutable is safe.
            conn = sqlite3.connect(f"file:{quoted}?immutable=1", uri=True)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        try:
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{path}: schema version {version} is newer than this appliance's "
                                  f"{SCHEMA_VERSION}")
            if version == 0:
                return []
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise LedgerError(f"{path}: {e}") from e


def tokens_since(path: Path, since: float) -> dict[str, int]:
    """Per client, prompt plus completion tokens in the hours that start at or after ``since`` (unix time).
    {} when the file does not exist; LedgerError when it cannot be read."""
    if not path.exists():
        return {}
    rows = _read(path, "SELECT client, SUM(prompt_tokens + completion_tokens) FROM usage WHERE hour >= ? "
                       "GROUP BY client", (since,))
    return {client: int(total) for client, total in rows}


def query(path: Path, since: float, by: Sequence[str]) -> list[dict[str, str | int]]:
    """Usage grouped by ``by`` (a subset of GROUP_FIELDS, in the order wanted), from the hour that ``since`` falls in:
    one dict per group with the fields of ``by`` and requests, prompt_tokens, completion_tokens, total_tokens; ordered
    by time, then client, then model. [] when the file does not exist; LedgerError when it cannot be read."""
    unknown = set(by) - set(GROUP_FIELDS)
    if unknown:
        raise ValueError(f"unknown group fields {sorted(unknown)}; known: {', '.join(GROUP_FIELDS)}")
    if not path.exists():
        return []
    columns = [_GROUP_SQL[f] for f in by]
    order = [_GROUP_SQL[f] for f in _ORDER if f in by]
    sql = (f"SELECT {''.join(c + ', ' for c in columns)}SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) "
           f"FROM usage WHERE hour >= ?{' GROUP BY ' + ', '.join(columns) if columns else ''}"
           f"{' ORDER BY ' + ', '.join(order) if order else ''}")
    out: list[dict[str, str | int]] = []
    for row in _read(path, sql, (hour_of(since),)):
        *groups, requests, prompt, completion = row
        if requests is None:  # no grouping and no rows: SUM() over nothing
            continue
        counts = {"requests": int(requests), "prompt_tokens": int(prompt), "completion_tokens": int(completion)}
        out.append({**{f: str(g) for f, g in zip(by, groups, strict=True)}, **counts,
                    "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"]})
    return out
