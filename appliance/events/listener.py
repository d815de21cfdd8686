"""supervisord event listener: turns PROCESS_STATE events into lifecycle events in the JSONL event log.

supervisord speaks a line protocol with its listeners over stdin/stdout, so nothing but protocol may be written to
stdout here; diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

from supervisor import childutils

from appliance.config import load
from appliance.runtime.names import program_name

# supervisord state -> lifecycle event type (SPEC §5). EXITED during RUNNING is a crash; the listener cannot see exit
# codes, supervisord's log has them.
_TYPES = {
    "PROCESS_STATE_STARTING": "started",
    "PROCESS_STATE_RUNNING": "running",
    "PROCESS_STATE_BACKOFF": "crashed",
    "PROCESS_STATE_EXITED": "crashed",
    "PROCESS_STATE_FATAL": "failed",
    "PROCESS_STATE_STOPPING": "stopping",
    "PROCESS_STATE_STOPPED": "stopped",
}


def lifecycle_event(eventname: str, fields: dict[str, str], models: dict[str, str], now: float) -> dict[str, object]:
    kind = _TYPES.get(eventname, eventname.lower())
    if kind == "started" and fields.get("from_state") in ("BACKOFF", "EXITED"):
        kind = "restarted"
    if kind == "crashed" and fields.get("expected") == "1":
        kind = "exited"
    name = fields.get("processname", "")
    event: dict[str, object] = {"ts": round(now, 3), "event": "lifecycle", "type": kind, "program": name,
                                "from_state": fields.get("from_state")}
    if name in models:
        event["model"] = models[name]
    if "pid" in fields:
        event["pid"] = int(fields["pid"])
    return event


def run(events_path: Path, models: dict[str, str], stdin: TextIO, stdout: TextIO) -> None:
    events_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        headers, payload = childutils.listener.wait(stdin, stdout)
        fields, _ = childutils.eventdata(payload + "\n")
        event = lifecycle_event(headers["eventname"], fields, models, time.time())
        with events_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        childutils.listener.ok(stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description="supervisord event listener (run by supervisord)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    cfg = load(args.config, check_files=False)
    models = {program_name(m): m.name for m in cfg.models}
    run(Path(cfg.supervision.runtime_dir) / "events.jsonl", models, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
