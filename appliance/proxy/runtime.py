"""Per-worker state shared by the resources, the middleware, the lifespan hooks and the draining worker."""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import time
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig, ModelConfig, is_pattern, read_api_keys
from appliance.events.sink import EventSink
from appliance.lifecycle.client import socket_path
from appliance.policy.gate import Gate
from appliance.proxy.exchange import Exchange
from appliance.proxy.readiness import Readiness
from appliance.proxy.upstream import Upstream
from appliance.shared.admission import FairShare, admission_dir
from appliance.shared.hostload import HostLoad, load_dir
from appliance.shared.modelstate import ModelStates, state_dir
from appliance.usage.ledger import UsageRecorder, ledger_path


class Deadlines:
    """Tasks to cancel once a moment has passed: the bound on each request's wait for response headers.

    One timer for all of them, armed for the earliest, rather than one per request (``asyncio.timeout`` cost about
    7 us a request on this loop, an entry here about 0.2 us); nothing wakes the worker while no request waits."""

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[Any], float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[Any], after_s: float) -> None:
        loop = asyncio.get_running_loop()
        due = self._due[task] = loop.time() + after_s
        if self._timer is None or due < self._timer.when():
            self._arm(loop, due)

    def discard(self, task: asyncio.Task[Any]) -> bool:
        """Forget ``task``; False when it was not there (already cancelled at its deadline, or never added)."""
        return self._due.pop(task, None) is not None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task in [t for t, due in self._due.items() if due <= now]:
            del self._due[task]
            task.cancel()
        if self._due:  # requests that finished in time left their entries: the rest are later
            self._arm(loop, min(self._due.values()))


class Runtime:
    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.upstream = Upstream()
        self.events = EventSink(cfg.events, cfg.events_file)
        self.load = HostLoad(load_dir(cfg), (m.name for m in cfg.models))
        #: The on-demand models' states, as the model manager sets them (read once per request for such a model).
        self.model_states = ModelStates(state_dir(cfg), tuple(m.name for m in cfg.models if m.on_demand))
        self.readiness = Readiness(cfg, self.upstream, self.model_states)
        self.lifecycle_socket = socket_path(cfg.supervision.runtime_dir)
        #: (key, its name) pairs; empty means no authentication.
        self.keys: tuple[tuple[bytes, str], ...] = ()
        if cfg.server.api_keys_file:
            self.keys = tuple((k.encode(), n) for k, n in read_api_keys(Path(cfg.server.api_keys_file)).items())
        #: The clients' policies; without keys every request is the client "anonymous".
        self.gate = Gate(cfg, [n for _, n in self.keys] or ["anonymous"])
        #: The model's slots, shared fairly between the clients waiting for them (after the queue bound).
        self.fair = FairShare(admission_dir(cfg), {m.name: m.parallel for m in cfg.models},
                              lambda: self.load.slot, lambda: self.load.high)
        #: Requests and tokens per client and model, for the usage ledger and appliance_tokens_total.
        self.usage = UsageRecorder(ledger_path(cfg))
        self.cors_origins = frozenset(cfg.server.cors_allow_origins)
        self.in_flight = 0
        self.draining = False
        #: The worker is on its way out (draining or retiring): every response closes its connection.
        self.closing = False
        #: Each in-flight request's watch for its client's disconnect; ``cut`` cancels them all.
        self.watches: set[asyncio.Future[None]] = set()
        #: Requests waiting for response headers, cancelled when they have waited request_timeout_s.
        self.deadlines = Deadlines()
        self.started = int(time.time())
        self.names: dict[str, ModelConfig] = {}
        #: Alias patterns (``gpt-*``), in config order: tried only when no exact name or alias matches.
        self.patterns: tuple[tuple[str, ModelConfig], ...] = tuple(
            (a, m) for m in cfg.models for a in m.aliases if is_pattern(a))
        for m in cfg.models:
            for n in (m.name, *m.aliases):
                if not is_pattern(n):
                    self.names[n] = m

    def try_enter(self, model: ModelConfig) -> bool:
        """Admit one request for ``model`` unless the host already has ``parallel + max_queue`` in flight."""
        if not self.load.try_enter(model.name, model.queue_limit):
            return False
        self.in_flight += 1
        return True

    def leave(self, model: ModelConfig, ex: Exchange) -> None:
        self.load.leave(model.name)
        self.in_flight -= 1
        if ex.admission is not None:
            ex.admission.leave()
        if ex.ticket is not None:
            self.fair.leave(ex.ticket)
            ex.ticket = None

    def settle(self, ex: Exchange) -> None:
        """A request forwarded to a model is over: it goes to the ledger, and its tokens to its client's windows."""
        prompt, completion = ex.tokens() if ex.kept else (0, 0)
        self.usage.record(ex.client, ex.model, prompt, completion)
        self.gate.charge(ex.client, prompt + completion)

    def cut(self) -> None:
        """The drain's grace period is over: end every request still in flight now, each with a proper answer (an
        SSE error event, or 503), rather than leave them to be cancelled mid-write when the worker exits."""
        for watch in list(self.watches):
            watch.cancel()

    def match_pattern(self, name: str) -> ModelConfig | None:
        """The first model with an alias pattern that ``name`` matches (names clients hard-code: gpt-*, claude-*)."""
        return next((m for pattern, m in self.patterns if fnmatch.fnmatchcase(name, pattern)), None)

    def default_model(self, kind: str, visible: frozenset[str] | None = None) -> ModelConfig | None:
        """The first model of ``kind`` (of those a client may use, when ``visible`` names them)."""
        return next((m for m in self.cfg.models if m.kind == kind and (visible is None or m.name in visible)), None)

    def key_name(self, presented: bytes) -> str | None:
        """The name of the key presented, or None. Every key is compared, so the time taken does not reveal which
        key (or how much of it) matched."""
        name = None
        for key, key_name in self.keys:
            if hmac.compare_digest(presented, key):
                name = key_name
        return name

    def cors_origin(self, origin: str) -> str | None:
        """The value of Access-Control-Allow-Origin for ``origin``, or None when it is not allowed."""
        return origin if origin in self.cors_origins or "*" in self.cors_origins else None
