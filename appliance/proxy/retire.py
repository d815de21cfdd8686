"""Telling a worker replaced by a reload apart from one stopped with the whole proxy.

Both get SIGTERM. A worker of a stopping proxy drains: it keeps its socket, reports ``draining`` on /health so a load
balancer takes the host out, and answers new work with 503. A worker replaced on SIGHUP must do neither, since new
workers already accept on the same socket: it closes its copy of the listening socket, lets its open connections finish
their current response and exits. The arbiter marks the workers it is about to replace (gunicorn's ``on_reload`` hook
runs before the new workers are spawned and the old ones get SIGTERM).

Once a retiring worker has closed its listening socket it says so in a second file, one line per worker. ``appliance
reload`` waits for every marked worker to have said so (or exited) before it returns, so that from then on every new
connection gets the new settings. Files, not /proc: the systemd unit's ``PrivateUsers=`` runs ``ExecReload`` in a user
namespace of its own, from which the proxy's processes are invisible.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from appliance.config import ApplianceConfig


def retiring_file(cfg: ApplianceConfig) -> Path:
    return Path(cfg.supervision.runtime_dir) / "proxy-retiring.json"


def retired_file(cfg: ApplianceConfig) -> Path:
    return Path(cfg.supervision.runtime_dir) / "proxy-retired"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def mark(path: Path, pids: Iterable[int]) -> None:
    _replace(path, json.dumps(sorted(pids)))


def marked(path: Path) -> set[int] | None:
    """The workers the arbiter marked, or None before it has written the file."""
    with contextlib.suppress(OSError, ValueError):
        return set(json.loads(path.read_text()))
    return None


def is_marked(path: Path, pid: int) -> bool:
    return pid in (marked(path) or set())


def acknowledge(path: Path, pid: int) -> None:
    """Record that this worker no longer accepts connections. O_APPEND keeps each worker's line whole."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)


def acknowledged(path: Path) -> set[int]:
    with contextlib.suppress(OSError, ValueError):
        return {int(line) for line in path.read_text().split()}
    return set()


def forget_acknowledged(path: Path, keep: Callable[[int], bool]) -> None:
    """Drop the lines of workers not to ``keep``. Rewritten in place, not replaced: the file stays the workers' own
    (``appliance reload`` may run as another user)."""
    with contextlib.suppress(OSError, ValueError), path.open("r+") as f:
        kept = [pid for pid in map(int, f.read().split()) if keep(pid)]
        f.seek(0)
        f.write("".join(f"{pid}\n" for pid in kept))
        f.truncate()
