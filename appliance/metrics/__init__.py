"""Prometheus metrics: the proxy's own (multiprocess) and the loopback exporter that merges everything."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from appliance.config import ApplianceConfig

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiproc_dir(cfg: ApplianceConfig) -> Path:
    """Where the gunicorn workers write their metric files and the exporter reads them."""
    return Path(cfg.supervision.runtime_dir) / "prometheus"


def restarts_file(cfg: ApplianceConfig) -> Path:
    """The supervisord event listener's counters: restarts per program, lifecycle events it could not write."""
    return Path(cfg.supervision.runtime_dir) / "restarts.json"


def read_restarts(cfg: ApplianceConfig) -> dict[str, int]:
    """{program: restarts} as the listener last wrote it; empty before the first restart or without supervisord."""
    return read_restarts_file(restarts_file(cfg))[1]


def read_lifecycle_dropped(cfg: ApplianceConfig) -> int:
    """Lifecycle events the listener could not write to the event log (a full disk...), as it last recorded them."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        return int(json.loads(restarts_file(cfg).read_text()).get("events_dropped", 0))
    return 0


def read_restarts_file(path: Path) -> tuple[int | None, dict[str, int]]:
    """(pid of the supervisord the counts belong to, {program: restarts})."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        doc = json.loads(path.read_text())
        counts = doc["counts"]
        return int(doc["supervisord_pid"]), {str(k): int(v) for k, v in counts.items()}
    return None, {}
