"""Per-model readiness, learned from each llama-server's own ``/health`` and, when present, from supervisord.

"The process is running" says nothing about whether the model is loaded: llama-server answers 503 until it is. Each
worker polls every child in the background and the request path only reads the result, so readiness costs a request
nothing. A refused connection marks the model not ready at once, without waiting for the next poll. Restart counts are
the event listener's (one count for the host, whichever worker answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig, ModelConfig
from appliance.metrics import read_restarts
from appliance.proxy.upstream import Upstream
from appliance.runtime.names import program_name
from appliance.runtime.supervisor_rpc import all_process_info
from appliance.shared import modelstate

log = logging.getLogger("appliance.proxy")

READY, LOADING, RESTARTING, FAILED, STOPPED = "ready", "loading", "restarting", "failed", "stopped"


@dataclass
class ModelState:
    state: str = LOADING
    since: float = 0.0
    restarts: int = 0
    ever_ready: bool = False
    #: Why an on-demand model's last load failed (from the model manager), without paths.
    error: str = ""
    #: When a failed on-demand load may be tried again (time.time()); until then its requests get 502 at once.
    retry_at: float = 0.0

    def set(self, state: str) -> None:
        self.ever_ready |= state == READY
        if state != self.state:
            self.state = state
            self.since = time.time()


def _supervisor_view(cfg: ApplianceConfig, socket_path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """supervisord's state per program and the listener's restart counts (blocking: run in a thread)."""
    return {i["name"]: i for i in all_process_info(socket_path)}, read_restarts(cfg)


def _manager_errors(cfg: ApplianceConfig) -> dict[str, tuple[str, float]]:
    """The last load error of each on-demand model and when it may be tried again, from the model manager's status
    file (written when something changes: its retry delay counts from the file's modification time)."""
    path = modelstate.status_file(cfg)
    try:
        written = path.stat().st_mtime
        doc = json.loads(path.read_text())
        return {name: (str(m.get("last_error", "")), written + float(m.get("retry_in_s", 0)))
                for name, m in doc["models"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


class Readiness:
    def __init__(self, cfg: ApplianceConfig, upstream: Upstream, states: modelstate.ModelStates,
                 interval_s: float = 1.0) -> None:
        self._cfg = cfg
        self._states = states
        self._on_demand = frozenset(m.name for m in cfg.models if m.on_demand)
        self._upstream = upstream
        self._interval = interval_s
        now = time.time()
        self.models: dict[str, ModelState] = {m.name: ModelState(since=now) for m in cfg.models}
        sock = Path(cfg.supervision.runtime_dir) / "supervisor.sock"
        self._supervisor_socket: Path | None = sock if sock.exists() else None
        self._task: asyncio.Task[None] | None = None

    def current(self, name: str) -> ModelState:
        """A model's state now: an on-demand model's is the model manager's (read from shared memory), so that it shows
        loaded the moment its first request is answered, not at the next poll."""
        st = self.models[name]
        if name in self._on_demand:
            managed = self._states.get(name)
            if managed != modelstate.READY:
                st.set(modelstate.NAMES[managed])
            elif st.state not in (READY, RESTARTING):
                st.set(READY)
        return st

    def can_serve(self, model: ModelConfig) -> bool:
        """Whether a request for ``model`` sent now would be served: it is ready, or it is on demand and a request
        would load it (unloaded, loading, unloading, or failed with its backoff over). What a load balancer checks
        per model (``GET /health/models/{name}``)."""
        st = self.current(model.name)
        if st.state == READY:
            return True
        if not model.on_demand:
            return False
        return st.state != FAILED or time.time() >= st.retry_at

    def is_ready(self, model: ModelConfig) -> bool:
        return self.models[model.name].state == READY

    def mark_refused(self, model: ModelConfig) -> None:
        st = self.models[model.name]
        if st.state == READY:
            st.set(RESTARTING)

    async def poll_once(self) -> None:
        sup: dict[str, dict[str, Any]] = {}
        restarts: dict[str, int] = {}
        if self._supervisor_socket is not None:
            try:
                sup, restarts = await asyncio.to_thread(_supervisor_view, self._cfg, self._supervisor_socket)
            except (OSError, xmlrpc.client.Error) as e:
                log.debug("supervisord not reachable: %s", e)
        errors = _manager_errors(self._cfg) if self._on_demand else {}
        statuses = await asyncio.gather(
            *(self._upstream.health(f"http://127.0.0.1:{m.port}", timeout_s=2.0) for m in self._cfg.models)
        )
        for m, status in zip(self._cfg.models, statuses, strict=True):
            st = self.models[m.name]
            program = program_name(m)
            st.restarts = restarts.get(program, st.restarts)
            statename = sup.get(program, {}).get("statename")
            st.error, st.retry_at = errors.get(m.name, ("", 0.0))
            if m.on_demand and self._states.get(m.name) != modelstate.READY:
                self.current(m.name)  # the model manager's word: unloaded, loading, unloading or failed to load
            elif status == 200:
                st.set(READY)
            elif statename == "FATAL":
                st.set(FAILED)
            elif statename in ("STOPPED", "STOPPING"):
                # Only an operator's stop. EXITED is supervisord's state between a crash and the restart it makes
                # (autorestart=true): that is the "restarting" below.
                st.set(STOPPED)
            else:
                # Not answering, or answering 503 while it loads: a model that was ready before is restarting.
                st.set(RESTARTING if st.ever_ready or st.restarts else LOADING)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll_once()
            except Exception:  # a poller that dies would freeze every model's state
                log.exception("readiness poll failed")

    async def start(self) -> None:
        await self.poll_once()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self) -> tuple[str, str]:
        """(status, warm_up_state) for /health, before draining is taken into account. An on-demand model decides
        only when its load failed: unloaded, it is ready to be loaded by the first request."""
        states = {s.state for name, s in self.models.items() if name not in self._on_demand}
        if any(self.current(name).state == FAILED for name in self._on_demand):
            states.add(FAILED)
        if states <= {READY}:
            return "ok", "ready"
        if FAILED in states:
            return "unhealthy", "unhealthy"
        return "starting", "loading"
