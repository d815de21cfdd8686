"""``appliance usage`` as operators run it: a real process reading a ledger the recorder wrote."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from appliance.usage.command import parse_by, parse_since, plain_table, rich_table
from appliance.usage.ledger import UsageRecorder
from tests.helpers import REPO, free_port, stub_config, write_config

DAY = datetime(2026, 11, 30, tzinfo=UTC).timestamp()
SINCE = "2026-11-29"


def usage(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "usage", "--config", str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "appliance.toml", stub_config(tmp_path, free_port(), free_port()))


@pytest.fixture()
def filled(config: Path, tmp_path: Path) -> Path:
    async def main() -> None:
        r = UsageRecorder(tmp_path / "state" / "usage.sqlite3")  # stub_config's state_dir
        await r.start()
        r.record("alice", "chat-a", 1200, 345, now=DAY + 9 * 3600)
        r.record("alice", "chat-a", 800, 55, now=DAY + 10 * 3600)
        r.record("alice", "embed-a", 4096, 0, now=DAY + 11 * 3600)
        r.record("bob", "chat-a", 10, 20, now=DAY + 86400 + 60)
        await r.stop()

    asyncio.run(main())
    return config


def test_json_by_client_model_and_day(filled: Path) -> None:
    r = usage(filled, "--since", SINCE, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert json.loads(r.stdout) == [
        {"client": "alice", "model": "chat-a", "day": "2026-11-30", "requests": 2, "prompt_tokens": 2000,
         "completion_tokens": 400, "total_tokens": 2400},
        {"client": "alice", "model": "embed-a", "day": "2026-11-30", "requests": 1, "prompt_tokens": 4096,
         "completion_tokens": 0, "total_tokens": 4096},
        {"client": "bob", "model": "chat-a", "day": "2026-12-01", "requests": 1, "prompt_tokens": 10,
         "completion_tokens": 20, "total_tokens": 30}]


def test_csv_by_hour_and_client(filled: Path) -> None:
    r = usage(filled, "--since", SINCE, "--by", "hour,client", "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert list(csv.reader(io.StringIO(r.stdout))) == [
        ["hour", "client", "requests", "prompt_tokens", "completion_tokens", "total_tokens"],
        ["2026-11-30T09:00Z", "alice", "1", "1200", "345", "1545"],
        ["2026-11-30T10:00Z", "alice", "1", "800", "55", "855"],
        ["2026-11-30T11:00Z", "alice", "1", "4096", "0", "4096"],
        ["2026-12-01T00:00Z", "bob", "1", "10", "20", "30"]]


def test_table_piped_is_plain_aligned_columns_with_a_total(filled: Path, tmp_path: Path) -> None:
    r = usage(filled, "--since", "2026-11-30T10:30", "--by", "model")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"usage since 2026-11-30 10:00 UTC ({tmp_path / 'state' / 'usage.sqlite3'})",
        "MODEL    REQUESTS  PROMPT  COMPLETION  TOTAL",
        "chat-a          2     810          75    885",
        "embed-a         1    4096           0   4096",
        "TOTAL           3    4906          75   4981"]


def test_the_default_window_is_seven_days(config: Path, tmp_path: Path) -> None:
    async def main() -> None:
        r = UsageRecorder(tmp_path / "state" / "usage.sqlite3")
        await r.start()
        r.record("recent", "chat-a", 1, 1)
        r.record("old", "chat-a", 1, 1, now=DAY - 86400 * 8 - 3600)  # before the default 7 days in any case
        await r.stop()

    asyncio.run(main())
    r = usage(config, "--format", "json", "--by", "client")
    assert [row["client"] for row in json.loads(r.stdout)] == ["recent"]


@pytest.mark.parametrize(("fmt", "out"), [("json", "[]\n"),
                                          ("csv", "client,model,day,requests,prompt_tokens,completion_tokens,"
                                                  "total_tokens\n")])
def test_no_ledger_yet_is_a_note_and_an_empty_report(config: Path, tmp_path: Path, fmt: str, out: str) -> None:
    r = usage(config, "--format", fmt)
    assert r.returncode == 0
    assert r.stdout == out
    assert r.stderr == f"no usage recorded yet: {tmp_path / 'state' / 'usage.sqlite3'} does not exist\n"
    assert not (tmp_path / "state").exists()


def test_no_ledger_yet_as_a_table(config: Path) -> None:
    r = usage(config)
    assert r.returncode == 0
    assert r.stdout.splitlines()[1:] == ["CLIENT  MODEL  DAY  REQUESTS  PROMPT  COMPLETION  TOTAL",
                                         "TOTAL                      0       0           0      0"]


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "7x"], "argument --since: '7x': expected a duration before now (30m, 12h, 7d, 2w"),
    (["--since", "yesterday"], "or an ISO date or date and time in UTC"),
    (["--by", "client,week"], "argument --by: unknown field(s) week; known: client, model, day, hour"),
    (["--by", ","], "argument --by: no field given; known: client, model, day, hour"),
    (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
])
def test_bad_arguments_are_usage_errors_that_say_what_is_accepted(config: Path, args: list[str], message: str) -> None:
    r = usage(config, *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_an_unreadable_ledger_fails_with_its_path_and_reason(config: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "usage.sqlite3").write_bytes(b"garbage" * 1000)
    r = usage(config)
    assert r.returncode == 1
    assert r.stderr == f"usage: {tmp_path / 'state' / 'usage.sqlite3'}: file is not a database\n"


def test_a_bad_config_is_reported_like_every_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n")
    r = usage(bad)
    assert r.returncode == 1
    assert f"{bad}: " in r.stderr and "problem(s)" in r.stderr


def test_parse_since() -> None:
    now = DAY + 1234.5
    assert parse_since("30m", now) == now - 1800
    assert parse_since("12h", now) == now - 12 * 3600
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("2w", now) == now - 14 * 86400
    assert parse_since("2026-11-30") == DAY
    assert parse_since("2026-11-30T01:30") == DAY + 5400
    assert parse_since("2026-11-30T02:30+01:00") == DAY + 5400


def test_parse_by_keeps_the_order_given_without_repeats() -> None:
    assert parse_by("day, client,day") == ("day", "client")


def test_the_terminal_table_has_the_same_rows_and_totals() -> None:
    rows: list[dict[str, str | int]] = [
        {"client": "a", "requests": 2, "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        {"client": "b", "requests": 1, "prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}]
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(rich_table(rows, ("client",), "title"))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for cells in (["a", "2", "10", "5", "15"], ["b", "1", "1", "0", "1"], ["TOTAL", "3", "11", "5", "16"]):
        assert any(line.replace("│", " ").split() == cells for line in text.splitlines()), text
    assert plain_table(rows, ("client",)).splitlines()[-1].split() == ["TOTAL", "3", "11", "5", "16"]


def test_a_reader_who_may_not_write_the_directory_reads_it_running_or_not(filled: Path, tmp_path: Path) -> None:
    """An operator in the service's group can read the file but not write its directory: without a writer SQLite could
    not create the -shm file WAL mode needs; with one, the -wal file holds what the readers must see too."""
    if os.geteuid() != 0:  # as the container lab: the test suite runs as root (setpriv is util-linux's, always there)
        pytest.fail("this test needs root, to read the ledger as another user (setpriv)")
    shared = Path(tempfile.mkdtemp())  # pytest's tmp_path is not reachable for another user
    try:
        shutil.copytree(tmp_path / "state", shared / "state")
        config = write_config(shared / "appliance.toml", stub_config(shared, free_port(), free_port()))
        for p in [shared, shared / "state", config, *(shared / "state").iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)

        def as_nobody() -> subprocess.CompletedProcess[str]:
            return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                                   "appliance", "usage", "--config", str(config), "--since", SINCE, "--by", "client",
                                   "--format", "csv"], cwd=REPO, capture_output=True, text=True, timeout=60)

        r = as_nobody()
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[1:] == ["alice,3,6096,400,6496", "bob,1,10,20,30"]

        async def while_written() -> subprocess.CompletedProcess[str]:
            rec = UsageRecorder(shared / "state" / "usage.sqlite3")
            await rec.start()
            rec.record("carol", "chat-a", 1, 1, now=DAY)
            await rec.flush()  # in the -wal file until a checkpoint
            for p in (shared / "state").iterdir():
                p.chmod(0o644)
            r = await asyncio.to_thread(as_nobody)
            await rec.stop()
            return r

        r = asyncio.run(while_written())
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[1:] == ["alice,3,6096,400,6496", "bob,1,10,20,30", "carol,1,1,1,2"]
    finally:
        shutil.rmtree(shared)
