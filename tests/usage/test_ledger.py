"""The usage ledger on a real SQLite file: per-hour aggregation, batched upserts that add up across flushes, recorders
and processes, failures that keep the counts, and the readers."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from appliance.metrics import proxy as metrics
from appliance.usage import ledger
from appliance.usage.ledger import LedgerError, UsageRecorder, query, tokens_since
from tests.helpers import REPO

DAY = datetime(2026, 11, 30, tzinfo=UTC).timestamp()  # a UTC midnight
HOUR = 3600


def rows(path: Path) -> list[tuple[int, str, str, int, int, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT hour, client, model, requests, prompt_tokens, completion_tokens FROM usage "
                            "ORDER BY hour, client, model").fetchall()


def test_records_add_up_per_hour_client_and_model_and_each_flush_upserts(tmp_path: Path) -> None:
    path = tmp_path / "state" / "usage.sqlite3"

    async def main() -> None:
        r = UsageRecorder(path)
        await r.start()
        r.record("alice", "chat", 10, 5, now=DAY + 1)
        r.record("alice", "chat", 20, 7, now=DAY + HOUR - 1)  # the same hour
        r.record("alice", "chat", 1, 1, now=DAY + HOUR)  # the next one
        r.record("bob", "chat", 3, 0, now=DAY + 2)
        r.record("alice", "embed", 8, 0, now=DAY + 3)
        await r.flush()
        assert rows(path) == [(int(DAY), "alice", "chat", 2, 30, 12), (int(DAY), "alice", "embed", 1, 8, 0),
                              (int(DAY), "bob", "chat", 1, 3, 0), (int(DAY + HOUR), "alice", "chat", 1, 1, 1)]
        r.record("alice", "chat", 100, 50, now=DAY + 5)
        await r.stop()  # the last flush

    asyncio.run(main())
    assert rows(path)[0] == (int(DAY), "alice", "chat", 3, 130, 62)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == ledger.SCHEMA_VERSION


def test_the_background_task_writes_about_once_a_second_without_flush_calls(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"

    async def main() -> None:
        r = UsageRecorder(path)
        await r.start()
        r.record("alice", "chat", 1, 2, now=DAY)
        assert rows(path) == []  # nothing written on the request path
        for _ in range(40):
            await asyncio.sleep(0.1)
            if rows(path):
                break
        assert rows(path) == [(int(DAY), "alice", "chat", 1, 1, 2)]
        await r.stop()

    asyncio.run(main())


def test_two_recorders_in_one_process_add_up(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"

    async def main() -> None:
        a, b = UsageRecorder(path), UsageRecorder(path)
        await a.start()
        await b.start()
        a.record("alice", "chat", 1, 2, now=DAY)
        b.record("alice", "chat", 10, 20, now=DAY)
        await asyncio.gather(a.stop(), b.stop())

    asyncio.run(main())
    assert rows(path) == [(int(DAY), "alice", "chat", 2, 11, 22)]


WRITER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from appliance.usage.ledger import UsageRecorder

    async def main() -> None:
        r = UsageRecorder(Path(sys.argv[1]))
        await r.start()
        # Spread over about 3 s, so that the processes' once-a-second flushes overlap.
        for i in range(3000):
            r.record(f"client-{i % 3}", "chat", 2, 3, now=float(sys.argv[2]) + (i % 2) * 3600)
            if i % 100 == 0:
                await asyncio.sleep(0.1)
        await r.stop()

    asyncio.run(main())
""")


def test_processes_writing_one_file_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "usage.sqlite3"  # created by whichever process comes first
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(DAY)], cwd=REPO, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "cannot be written" not in err
    # 3000 requests per process, 500 per (hour, client); 3 processes.
    assert rows(path) == [(int(DAY + h), f"client-{c}", "chat", 1500, 3000, 4500) for h in (0, HOUR) for c in range(3)]
    assert tokens_since(path, DAY) == {f"client-{c}": 2 * (3000 + 4500) for c in range(3)}


def test_a_flush_waits_for_another_writer_instead_of_failing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usage.sqlite3"

    async def main() -> None:
        r = UsageRecorder(path)
        await r.start()
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another worker's write transaction, held for a while
        threading.Timer(1.5, other.execute, ["COMMIT"]).start()
        r.record("alice", "chat", 1, 2, now=DAY)
        started = time.monotonic()
        await r.flush()
        assert time.monotonic() - started >= 1.0
        await r.stop()
        other.close()

    asyncio.run(main())
    assert rows(path) == [(int(DAY), "alice", "chat", 1, 1, 2)]
    assert not caplog.messages


def test_an_unwritable_ledger_logs_once_keeps_the_counts_and_writes_them_later(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a regular file where the state directory should be")  # unwritable even for root
    path = blocker / "usage.sqlite3"
    caplog.set_level(logging.WARNING, "appliance.usage")

    async def main() -> None:
        r = UsageRecorder(path)
        await r.start()  # does not raise
        r.record("alice", "chat", 1, 2, now=DAY)
        await r.flush()
        r.record("alice", "chat", 10, 20, now=DAY)
        await r.flush()
        failures = [m for m in caplog.messages if "cannot be written" in m]
        assert len(failures) == 1, caplog.messages
        assert str(path) in failures[0] and "Not a directory" in failures[0]
        blocker.unlink()
        await r.flush()
        assert rows(path) == [(int(DAY), "alice", "chat", 2, 11, 22)]
        assert any("written again" in m for m in caplog.messages)
        await r.stop()

    asyncio.run(main())


def test_counts_kept_in_memory_are_bounded_to_the_newest_hours(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("")
    path = blocker / "usage.sqlite3"
    extra = 3

    async def main() -> None:
        r = UsageRecorder(path)
        await r.start()
        for h in range(ledger.MAX_PENDING_HOURS + extra):
            r.record("alice", "chat", 1, 1, now=DAY + h * HOUR)
            await r.flush()
        assert any("dropped the usage of 1 request(s)" in m for m in caplog.messages)
        blocker.unlink()
        await r.stop()

    asyncio.run(main())
    assert [row[0] for row in rows(path)] == [int(DAY + h * HOUR)
                                             for h in range(extra, ledger.MAX_PENDING_HOURS + extra)]


def test_a_corrupt_file_is_reported_not_raised_and_unreadable_for_the_report(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usage.sqlite3"
    path.write_bytes(b"this is not an SQLite database" * 100)

    async def main() -> None:
        r = UsageRecorder(path)
        await r.start()
        r.record("alice", "chat", 1, 2, now=DAY)
        await r.flush()
        await r.stop()

    asyncio.run(main())
    assert any("cannot be written" in m and "not a database" in m for m in caplog.messages), caplog.messages
    assert any("usage of 1 request(s) could not be written and is lost" in m for m in caplog.messages)
    with pytest.raises(LedgerError, match="not a database"):
        tokens_since(path, DAY)
    with pytest.raises(LedgerError, match="not a database"):
        query(path, DAY, ["client"])


def fill(path: Path) -> None:
    async def main() -> None:
        r = UsageRecorder(path)
        await r.start()
        r.record("alice", "chat", 100, 10, now=DAY - 1)  # 23:59:59 the day before
        r.record("alice", "chat", 1, 2, now=DAY)  # 00:00:00
        r.record("alice", "embed", 5, 0, now=DAY + 10)
        r.record("bob", "chat", 20, 30, now=DAY + HOUR + 5)
        r.record("bob", "chat", 1, 1, now=DAY + 86400)  # the next day
        await r.stop()

    asyncio.run(main())


def test_tokens_since_counts_the_hours_from_the_boundary_on(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    assert tokens_since(path, DAY) == {}
    assert not path.exists()  # reading never creates it
    fill(path)
    assert tokens_since(path, DAY) == {"alice": 3 + 5, "bob": 50 + 2}
    assert tokens_since(path, DAY - HOUR) == {"alice": 110 + 3 + 5, "bob": 50 + 2}
    assert tokens_since(path, DAY + 86400) == {"bob": 2}


def test_query_groups_by_any_subset_ordered_by_time_then_client_then_model(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    assert query(path, DAY, ["client"]) == []
    fill(path)
    assert query(path, DAY, ["client", "model", "day"]) == [
        {"client": "alice", "model": "chat", "day": "2026-11-30", "requests": 1, "prompt_tokens": 1,
         "completion_tokens": 2, "total_tokens": 3},
        {"client": "alice", "model": "embed", "day": "2026-11-30", "requests": 1, "prompt_tokens": 5,
         "completion_tokens": 0, "total_tokens": 5},
        {"client": "bob", "model": "chat", "day": "2026-11-30", "requests": 1, "prompt_tokens": 20,
         "completion_tokens": 30, "total_tokens": 50},
        {"client": "bob", "model": "chat", "day": "2026-12-01", "requests": 1, "prompt_tokens": 1,
         "completion_tokens": 1, "total_tokens": 2}]
    hours = query(path, DAY - 1, ["hour"])  # `since` inside an hour counts that whole hour
    assert [(r["hour"], r["requests"], r["total_tokens"]) for r in hours] == [
        ("2026-11-29T23:00Z", 1, 110), ("2026-11-30T00:00Z", 2, 8), ("2026-11-30T01:00Z", 1, 50),
        ("2026-12-01T00:00Z", 1, 2)]
    assert query(path, 0, ["model"]) == [
        {"model": "chat", "requests": 4, "prompt_tokens": 122, "completion_tokens": 43, "total_tokens": 165},
        {"model": "embed", "requests": 1, "prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}]
    assert query(path, 0, []) == [{"requests": 5, "prompt_tokens": 127, "completion_tokens": 43,
                                   "total_tokens": 170}]
    assert query(path, DAY + 2 * 86400, ["client"]) == []
    with pytest.raises(ValueError, match="known: client, model, day, hour"):
        query(path, 0, ["week"])


def test_records_count_the_tokens_metric(tmp_path: Path) -> None:
    def sample(client: str, direction: str) -> float:
        return REGISTRY.get_sample_value("appliance_tokens_total", {"client": client, "model": "m-tokens",
                                                                    "direction": direction}) or 0.0

    before = {(c, d): sample(c, d) for c in ("alice", "bob") for d in ("prompt", "completion")}
    r = UsageRecorder(tmp_path / "usage.sqlite3")
    r.record("alice", "m-tokens", 7, 3)
    r.record("alice", "m-tokens", 5, 0)
    r.record("bob", "m-tokens", 0, 0)
    metrics.flush()
    assert {k: sample(*k) - v for k, v in before.items()} == {
        ("alice", "prompt"): 12, ("alice", "completion"): 3, ("bob", "prompt"): 0, ("bob", "completion"): 0}
