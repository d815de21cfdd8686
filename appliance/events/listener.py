"""supervisord event listener: PROCESS_STATE events become lifecycle events, and feed the restart counters.

supervisord speaks a line protocol with its listeners over stdin/stdout, so nothing but protocol may be written to
stdout here; diagnostics go to stderr. The event does not carry the exit status, and by the time it is delivered
supervisord may already have respawned the program (which resets the status XML-RPC reports), so it is read from
supervisord's own "exited: ..." log line. "ready" is learned by polling the restarted llama-server's /health in a
thread, since supervisord cannot see it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

from supervisor import childutils

from appliance.config import ApplianceConfig, ModelConfig, load
from appliance.events.sink import append_jsonl
from appliance.metrics import read_lifecycle_dropped, read_restarts_file, restarts_file
from appliance.runtime.names import program_name

_TYPES = {
    "PROCESS_STATE_STARTING": "started",
    "PROCESS_STATE_RUNNING": "running",
    "PROCESS_STATE_BACKOFF": "crashed",
    "PROCESS_STATE_EXITED": "crashed",
    "PROCESS_STATE_FATAL": "failed",
    "PROCESS_STATE_STOPPING": "stopping",
    "PROCESS_STATE_STOPPED": "stopped",
}


def lifecycle_event(eventname: str, fields: dict[str, str], models: dict[str, str], now: float) -> dict[str, Any]:
    kind = _TYPES.get(eventname, eventname.lower())
    if kind == "started" and fields.get("from_state") in ("BACKOFF", "EXITED"):
        kind = "restarted"
    if kind == "crashed" and fields.get("expected") == "1":
        kind = "exited"
    name = fields.get("processname", "")
    event: dict[str, Any] = {"ts": round(now, 3), "event": "lifecycle", "type": kind, "program": name,
                             "from_state": fields.get("from_state")}
    if name in models:
        event["model"] = models[name]
    if "pid" in fields:
        event["pid"] = int(fields["pid"])
    return event


class Listener:
    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.models: dict[str, ModelConfig] = {program_name(m): m for m in cfg.models}
        self._model_names = {p: m.name for p, m in self.models.items()}
        self.restarts: dict[str, int] = {}
        #: Lifecycle events that could not be written (appliance_events_dropped_total{sink="lifecycle"}).
        self.dropped = 0
        self._lock = threading.Lock()
        self._counters_lock = threading.Lock()  # readiness watchers save from their threads too
        # Bumped at every state change of a model: a readiness watcher from an older start gives up.
        self._generation: dict[str, int] = {}
        self._supervisord_log = cfg.log_dir / "supervisord.log"

    def write(self, event: dict[str, Any]) -> None:
        """Append one event; one that cannot be written (a full disk...) is counted and the listener carries on, since
        supervisord's event flow must not stop."""
        ev = self.cfg.events
        with self._lock:
            try:
                append_jsonl(self.cfg.events_file, [event], ev.max_bytes, ev.backups)
            except OSError as e:
                self.dropped += 1
                print(f"events: cannot record {event['type']} of {event['program']}: {e}", file=sys.stderr,
                      flush=True)
                self._save_counters()

    def _exit(self, program: str) -> dict[str, Any]:
        """``exit_status`` or ``exit_signal`` of the program's last exit, from supervisord's log."""
        try:
            with open(self._supervisord_log, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 65536))
                tail = f.read().decode(errors="replace")
        except OSError:
            return {}
        found = re.findall(rf"exited: {re.escape(program)} \((exit status (\d+)|terminated by (\w+))", tail)
        if not found:
            return {}
        _, status, sig = found[-1]
        return {"exit_status": int(status)} if status else {"exit_signal": sig}

    def _count_restart(self, program: str) -> None:
        self.restarts[program] = self.restarts.get(program, 0) + 1
        self._save_counters()

    def _save_counters(self) -> None:
        """Best effort: on a full disk the exporter shows the last counts saved until a later save succeeds."""
        path = restarts_file(self.cfg)
        tmp = path.with_name(path.name + ".tmp")
        state = {"supervisord_pid": os.getppid(), "counts": self.restarts, "events_dropped": self.dropped}
        with self._counters_lock:
            try:
                tmp.write_text(json.dumps(state))
                tmp.replace(path)
            except OSError as e:
                print(f"events: cannot save the counters to {path}: {e}", file=sys.stderr, flush=True)

    def _watch_ready(self, program: str, generation: int) -> None:
        """Poll the child's /health until it answers 200 (ready) or its state changes again."""
        model = self.models[program]
        url = f"http://127.0.0.1:{model.port}/health"
        started = time.monotonic()
        while time.monotonic() - started < 600:
            if self._generation.get(program) != generation:
                return
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        self.write({"ts": round(time.time(), 3), "event": "lifecycle", "type": "ready",
                                    "program": program, "model": model.name,
                                    "load_s": round(time.monotonic() - started, 3)})
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)

    def handle(self, eventname: str, fields: dict[str, str]) -> None:
        event = lifecycle_event(eventname, fields, self._model_names, time.time())
        program = event["program"]
        if event["type"] == "crashed":
            event.update(self._exit(program))
        if event["type"] == "restarted":
            self._count_restart(program)
        self.write(event)
        if program in self.models and event["type"] != "running":
            generation = self._generation.get(program, 0) + 1
            self._generation[program] = generation
            if event["type"] in ("started", "restarted"):
                threading.Thread(target=self._watch_ready, args=(program, generation), daemon=True).start()

    def run(self, stdin: TextIO, stdout: TextIO) -> None:
        # Counts start at zero with supervisord, like the proxy's metrics: a previous run's file must not linger. A
        # listener restarted by `appliance reload` under the same supervisord carries on counting.
        pid, counts = read_restarts_file(restarts_file(self.cfg))
        same = pid == os.getppid()
        self.restarts = counts if same else {}
        self.dropped = read_lifecycle_dropped(self.cfg) if same else 0
        self._save_counters()
        while True:
            headers, payload = childutils.listener.wait(stdin, stdout)
            fields, _ = childutils.eventdata(payload + "\n")
            self.handle(headers["eventname"], fields)
            childutils.listener.ok(stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description="supervisord event listener (run by supervisord)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    Listener(load(args.config, check_files=False)).run(sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
