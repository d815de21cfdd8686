"""Each on-demand model's state as the model manager last set it, in shared memory that every proxy worker maps.

The manager (``appliance.lifecycle.manager``) is the only writer. A worker reads one integer per request: READY means
"forward now"; anything else means "ask the manager and wait". Before the manager unloads a model it sets CLOSING,
waits a moment, and then waits for the model's in-flight count (``hostload``) to reach zero. A worker counts its
request in flight *before* it reads the state. So either the worker saw CLOSING and waits for the model's next turn,
or the manager sees its request in flight and does not stop the model under it. A request that waits for a load is
not counted in flight while it waits (it holds no memory), and is counted again before it reads the state anew.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

from appliance.config import ApplianceConfig

UNLOADED, LOADING, READY, CLOSING, FAILED = 0, 1, 2, 3, 4
#: The names /health, /v1/models and `appliance` show.
NAMES = {UNLOADED: "unloaded", LOADING: "loading", READY: "ready", CLOSING: "unloading", FAILED: "failed"}
_SIZE = 8
#: Why a model was unloaded: it stayed idle past idle_unload_s, made room for another, an operator stopped it (or it
#: crashed), or its load failed.
UNLOAD_REASONS = ("idle", "evicted", "operator", "failed")
#: The buckets of appliance_model_load_seconds, counted by the manager in its status file.
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def state_dir(cfg: ApplianceConfig) -> Path:
    return Path(cfg.supervision.runtime_dir) / "lifecycle"


def status_file(cfg: ApplianceConfig) -> Path:
    """The model manager's view, for the exporter and /health: counters, devices, waiting requests, last errors."""
    return state_dir(cfg) / "status.json"


def _path(directory: Path, model: str) -> Path:
    # Model names may hold any character; the file name must not.
    return directory / (hashlib.sha256(model.encode()).hexdigest()[:24] + ".state")


class ModelStates:
    """The states of ``models``, mapped once; a model's file is created (as UNLOADED) by whoever maps it first."""

    def __init__(self, directory: Path, models: tuple[str, ...]) -> None:
        if models:
            directory.mkdir(parents=True, exist_ok=True)
        self._views: dict[str, memoryview] = {}
        for name in models:
            fd = os.open(_path(directory, name), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < _SIZE:
                    os.ftruncate(fd, _SIZE)
                self._views[name] = memoryview(mmap.mmap(fd, _SIZE)).cast("q")
            finally:
                os.close(fd)

    def get(self, model: str) -> int:
        return int(self._views[model][0])

    def set(self, model: str, state: int) -> None:
        self._views[model][0] = state
