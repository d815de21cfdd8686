"""The JSONL event log on a filesystem that fills up and frees again: no torn line, ever (a real 64 KiB tmpfs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.events.sink import append_jsonl
from tests.e2e.faults_support import tmpfs


def test_a_write_that_does_not_fit_leaves_no_partial_line(tmp_path: Path) -> None:
    event = {"event": "request", "request_id": "x" * 32, "route": "/v1/completions", "status": 200}
    with tmpfs(tmp_path / "events", size="64k") as d:
        path = d / "events.jsonl"
        filler = d / "filler"
        filler.write_bytes(b"\0" * 40_000)  # something else that fills the disk, and is deleted later
        for _ in range(100):  # the ~24 KiB left hold a few batches of ~3 KiB
            try:
                append_jsonl(path, [event] * 30, max_bytes=1 << 30, backups=0)
            except OSError:
                break
        else:
            pytest.fail("the 64 KiB tmpfs never filled up")
        filler.unlink()
        append_jsonl(path, [event], max_bytes=1 << 30, backups=0)
        lines = path.read_text().splitlines()
        assert len(lines) > 30
        assert all(json.loads(line) == event for line in lines)
