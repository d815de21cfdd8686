"""The supervisord event listener's mapping from process states to lifecycle events, and its exit reasons."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from appliance.config import parse
from appliance.events.listener import Listener, lifecycle_event
from appliance.metrics import read_lifecycle_dropped
from tests.config.test_config import base_doc, tree  # noqa: F401  (fixture)

MODELS = {"model-chat": "chat"}


@pytest.mark.parametrize(("eventname", "fields", "kind"), [
    ("PROCESS_STATE_STARTING", {"from_state": "STOPPED"}, "started"),
    ("PROCESS_STATE_STARTING", {"from_state": "BACKOFF"}, "restarted"),
    ("PROCESS_STATE_STARTING", {"from_state": "EXITED"}, "restarted"),
    ("PROCESS_STATE_RUNNING", {"from_state": "STARTING", "pid": "7"}, "running"),
    ("PROCESS_STATE_EXITED", {"from_state": "RUNNING", "expected": "0", "pid": "7"}, "crashed"),
    ("PROCESS_STATE_EXITED", {"from_state": "RUNNING", "expected": "1", "pid": "7"}, "exited"),
    ("PROCESS_STATE_BACKOFF", {"from_state": "STARTING"}, "crashed"),
    ("PROCESS_STATE_FATAL", {"from_state": "BACKOFF"}, "failed"),
    ("PROCESS_STATE_STOPPING", {"from_state": "RUNNING", "pid": "7"}, "stopping"),
    ("PROCESS_STATE_STOPPED", {"from_state": "STOPPING", "pid": "7"}, "stopped"),
])
def test_state_to_lifecycle_type(eventname: str, fields: dict[str, str], kind: str) -> None:
    event = lifecycle_event(eventname, {"processname": "model-chat", **fields}, MODELS, 1.0)
    assert event["type"] == kind
    assert event["model"] == "chat" and event["program"] == "model-chat"
    assert ("pid" in event) == ("pid" in fields)


def test_exit_reason_comes_from_supervisords_log(tree: Path) -> None:  # noqa: F811
    doc = base_doc(tree)
    doc["supervision"] = {"runtime_dir": str(tree / "run")}
    listener = Listener(parse(doc, tree))
    logs = tree / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "supervisord.log").write_text(
        "2026-01-01 INFO exited: model-chat (exit status 1; not expected)\n"
        "2026-01-01 INFO exited: model-chat-2 (terminated by SIGSEGV (core dumped); not expected)\n"
        "2026-01-01 INFO exited: model-chat (terminated by SIGKILL; not expected)\n"
        "2026-01-01 INFO exited: model-emb (exit status 3; not expected)\n")
    assert listener._exit("model-chat") == {"exit_signal": "SIGKILL"}
    assert listener._exit("model-emb") == {"exit_status": 3}
    assert listener._exit("model-chat-2") == {"exit_signal": "SIGSEGV"}
    assert listener._exit("proxy") == {}


def test_restart_counts_survive_a_listener_restart_but_not_a_new_supervisord(tree: Path) -> None:  # noqa: F811
    doc = base_doc(tree)
    doc["supervision"] = {"runtime_dir": str(tree / "run")}
    (tree / "run").mkdir()
    counts = tree / "run" / "restarts.json"
    eof = io.StringIO("")  # the protocol loop ends at once: only the start-up bookkeeping runs

    def start_listener() -> dict[str, int]:
        listener = Listener(parse(doc, tree))
        with pytest.raises((EOFError, KeyError, ValueError)):
            listener.run(eof, io.StringIO())
        return listener.restarts

    counts.write_text(json.dumps({"supervisord_pid": os.getppid(), "counts": {"model-chat": 2}}))
    assert start_listener() == {"model-chat": 2}  # restarted by `appliance reload`: same supervisord
    counts.write_text(json.dumps({"supervisord_pid": os.getppid() + 1, "counts": {"model-chat": 2}}))
    assert start_listener() == {}  # a new supervisord: counting starts again
    assert json.loads(counts.read_text()) == {"supervisord_pid": os.getppid(), "counts": {}, "events_dropped": 0}


def test_lifecycle_events_that_cannot_be_written_are_counted(tree: Path) -> None:  # noqa: F811
    doc = base_doc(tree)
    doc["supervision"] = {"runtime_dir": str(tree / "run")}
    (tree / "run").mkdir()
    (tree / "full").write_text("")  # a file where the event log's directory should be: every append fails
    doc["events"] = {"file": str(tree / "full" / "events.jsonl")}
    cfg = parse(doc, tree)
    listener = Listener(cfg)
    listener.handle("PROCESS_STATE_STOPPED", {"processname": "exporter", "from_state": "STOPPING"})
    listener.handle("PROCESS_STATE_STARTING", {"processname": "exporter", "from_state": "STOPPED"})
    assert read_lifecycle_dropped(cfg) == 2
    # A listener restarted under the same supervisord carries on counting: the counter never goes backwards.
    with pytest.raises((EOFError, KeyError, ValueError)):
        Listener(cfg).run(io.StringIO(""), io.StringIO())
    assert read_lifecycle_dropped(cfg) == 2
