"""``appliance reload``: apply a changed config to a running appliance, touching only what changed.

The order matters: the new config is validated before anything is written (an invalid one changes nothing), then the
supervisord config is regenerated and supervisord is asked which program sections changed (``reloadConfig``). Each
model's section carries a fingerprint of its settings and files, so an unchanged model keeps its process while a
changed one restarts. Removed programs stop before added ones start, so that their ports are free. The proxy is never
stopped for a settings change: gunicorn re-reads its config on SIGHUP, starts new workers on the same socket and retires
the old ones after their in-flight requests (see ``appliance/proxy/retire.py``). The reload waits until the old workers
have stopped accepting connections, so that once it returns every new connection gets the new settings.
"""

from __future__ import annotations

import os
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig
from appliance.proxy import retire
from appliance.runtime import supervisor_rpc
from appliance.runtime.names import PROXY_PROGRAM, program_name
from appliance.runtime.supervisor_conf import proxy_fingerprint, runtime_paths, write_supervisor_conf


class ReloadError(RuntimeError):
    pass


@dataclass
class ReloadReport:
    added: list[str] = field(default_factory=list)
    #: On-demand models added: known from now on, loaded by their first request.
    added_on_demand: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    #: True when the proxy replaced its workers: the old ones no longer accept connections.
    proxy_workers_replaced: bool = False
    #: What went wrong, when the reload could not be completed (the CLI then exits 1).
    failure: str | None = None

    def lines(self) -> list[str]:
        out = [f"{verb} {', '.join(names)}" for verb, names in
               (("started", self.added), ("stopped", self.removed), ("restarted", self.restarted),
                ("added (loaded on its first request)", self.added_on_demand)) if names]
        if self.proxy_workers_replaced:
            out.append(f"replaced the {PROXY_PROGRAM} workers (in-flight requests finish on the old ones)")
        return out or ([] if self.failure else ["nothing changed"])


def _running_runtime_dir(conf: Path) -> str | None:
    """The runtime_dir of the supervisord config in force: changing it means another supervisord, not a reload."""
    try:
        text = conf.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("file=") and line.endswith("supervisor.sock"):
            return str(Path(line.removeprefix("file=")).parent)
    return None


def reload(cfg: ApplianceConfig, say: Callable[[str], None] = print) -> ReloadReport:
    """Apply ``cfg`` (already validated) to the supervisord that runs from its runtime_dir; ``say`` gets progress
    messages on long waits."""
    paths = runtime_paths(cfg)
    rpc = supervisor_rpc.server(paths["socket"])
    try:
        rpc.supervisor.getPID()
    except (OSError, xmlrpc.client.Fault) as e:
        raise ReloadError(f"no running appliance answers on {paths['socket']} ({e}); start it first "
                          "(systemctl start appliance, or appliance up)") from e
    running = _running_runtime_dir(paths["conf"])
    if running is not None and running != str(paths["dir"]):
        raise ReloadError(f"supervision.runtime_dir changed ({running} -> {paths['dir']}): restart the appliance")
    try:
        old_proxy = paths["proxy_fingerprint"].read_text().strip()
    except OSError:
        old_proxy = ""
    write_supervisor_conf(cfg)
    report = ReloadReport()
    try:
        added, changed, removed = rpc.supervisor.reloadConfig()[0]
        # New proxy workers first: from then on a removed model is unknown (404) rather than unreachable (502).
        if PROXY_PROGRAM not in changed and old_proxy != proxy_fingerprint(cfg):
            _replace_proxy_workers(rpc, cfg, report, say)
        for name in sorted(removed):
            _stop(rpc, name)
            rpc.supervisor.removeProcessGroup(name)
            report.removed.append(name)
        for name in sorted(changed):
            _stop(rpc, name)
            rpc.supervisor.removeProcessGroup(name)
            rpc.supervisor.addProcessGroup(name)
            report.restarted.append(name)
        on_demand = {program_name(m) for m in cfg.models if m.on_demand}
        for name in sorted(added):
            rpc.supervisor.addProcessGroup(name)
            (report.added_on_demand if name in on_demand else report.added).append(name)
    except xmlrpc.client.Fault as e:
        raise ReloadError(f"supervisord refused: {e.faultString}") from e
    return report


#: How long the old proxy workers get to stop accepting after the SIGHUP, beyond server.graceful_timeout_s. gunicorn
#: starts the new ones and sends the old ones SIGTERM at once, and a retiring worker closes its listening socket as soon
#: as it gets it (typically < 0.1 s). But after a reload the arbiter waits for the old workers to exit, up to
#: graceful_timeout, before it handles the next signal: a reload right after another, with streams under way, waits
#: that long.
SWITCH_MARGIN_S = 20.0
#: When to say why the reload is still waiting.
SWITCH_SAY_AFTER_S = 2.0


def _replace_proxy_workers(rpc: Any, cfg: ApplianceConfig, report: ReloadReport, say: Callable[[str], None]) -> None:
    """SIGHUP to the proxy's arbiter, then wait until the workers it replaces no longer accept connections."""
    marked, retired = retire.retiring_file(cfg), retire.retired_file(cfg)
    marked.unlink(missing_ok=True)  # the arbiter writes it anew on SIGHUP, listing the workers it replaces
    # Workers that have exited are forgotten: their numbers may be reused by new ones.
    retire.forget_acknowledged(retired, _alive)
    rpc.supervisor.signalProcess(PROXY_PROGRAM, "HUP")
    started = time.monotonic()
    timeout = cfg.server.graceful_timeout_s + SWITCH_MARGIN_S
    log = f"{cfg.log_dir}/{PROXY_PROGRAM}.log"
    said = False
    while (old := retire.marked(marked)) is None or (waiting := {
            pid for pid in old - retire.acknowledged(retired) if _alive(pid)}):
        waited = time.monotonic() - started
        if waited >= timeout:
            report.failure = (
                f"the {PROXY_PROGRAM} did not start replacing its workers {timeout:g} s after SIGHUP: it still "
                f"serves the old settings; see {log}" if old is None else
                f"the {PROXY_PROGRAM} workers {', '.join(map(str, sorted(waiting)))} still accept connections "
                f"{timeout:g} s after SIGHUP, so new connections may get the old settings; see {log}")
            return
        if old is None and waited >= SWITCH_SAY_AFTER_S and not said:
            say(f"waiting for the {PROXY_PROGRAM} to replace its workers: after a reload it lets the old workers "
                f"finish their streams before it takes the next one (server.graceful_timeout_s, "
                f"{cfg.server.graceful_timeout_s:g} s at most)")
            said = True
        time.sleep(0.02)
    report.proxy_workers_replaced = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its number taken by another user's process
        return False
    return True


def _stop(rpc: Any, group: str) -> None:
    try:
        rpc.supervisor.stopProcessGroup(group)
    except xmlrpc.client.Fault as e:
        # A program that is not running (FATAL, already stopped) has nothing to stop.
        if "NOT_RUNNING" not in e.faultString:
            raise
