"""Telling a worker replaced by a reload apart from one stopped with the whole proxy.

Both get SIGTERM. A worker of a stopping proxy drains: it keeps its socket, reports ``draining`` on /health so a load
balancer takes the host out, and answers new work with 503. A worker replaced on SIGHUP must do neither, since new
workers already accept on the same socket: it closes its copy of the listening socket, lets its open connections finish
their current response and exits. The arbiter marks the workers it is about to replace (gunicorn's ``on_reload`` hook
runs before the new workers are spawned and the old ones get SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

from appliance.config import ApplianceConfig


def retiring_file(cfg: ApplianceConfig) -> Path:
    return Path(cfg.supervision.runtime_dir) / "proxy-retiring.json"


def mark(path: Path, pids: Iterable[int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(sorted(pids)))
    tmp.replace(path)


def is_marked(path: Path, pid: int) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return pid in json.loads(path.read_text())
    return False
