"""Per-worker state shared by the resources, the middleware, the lifespan hooks and the draining worker."""

from __future__ import annotations

import asyncio
import hmac
import time
from pathlib import Path

from appliance.config import ApplianceConfig, ModelConfig, read_api_keys
from appliance.events.sink import EventSink
from appliance.metrics import proxy as metrics
from appliance.metrics.proxy import child
from appliance.proxy.hostload import HostLoad, load_dir
from appliance.proxy.readiness import Readiness
from appliance.proxy.upstream import Upstream


class Runtime:
    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.upstream = Upstream()
        self.readiness = Readiness(cfg, self.upstream)
        self.events = EventSink(cfg.events, cfg.events_file)
        self.load = HostLoad(load_dir(cfg), (m.name for m in cfg.models))
        #: (key, its name) pairs; empty means no authentication.
        self.keys: tuple[tuple[bytes, str], ...] = ()
        if cfg.server.api_keys_file:
            self.keys = tuple((k.encode(), n) for k, n in read_api_keys(Path(cfg.server.api_keys_file)).items())
        self.cors_origins = frozenset(cfg.server.cors_allow_origins)
        self.in_flight = 0
        self.draining = False
        #: The worker is on its way out (draining or retiring): every response closes its connection.
        self.closing = False
        #: Each in-flight request's watch for its client's disconnect; ``cut`` cancels them all.
        self.watches: set[asyncio.Future[None]] = set()
        self.started = int(time.time())
        self.names: dict[str, ModelConfig] = {}
        for m in cfg.models:
            for n in (m.name, *m.aliases):
                self.names[n] = m

    def try_enter(self, model: ModelConfig) -> bool:
        """Admit one request for ``model`` unless the host already has ``parallel + max_queue`` in flight."""
        if not self.load.try_enter(model.name, model.queue_limit):
            return False
        self.in_flight += 1
        child(metrics.IN_FLIGHT, model.name).inc()
        return True

    def leave(self, model: ModelConfig) -> None:
        self.load.leave(model.name)
        self.in_flight -= 1
        child(metrics.IN_FLIGHT, model.name).dec()

    def cut(self) -> None:
        """The drain's grace period is over: end every request still in flight now, each with a proper answer (an
        SSE error event, or 503), rather than leave them to be cancelled mid-write when the worker exits."""
        for watch in list(self.watches):
            watch.cancel()

    def default_model(self, kind: str) -> ModelConfig | None:
        return next((m for m in self.cfg.models if m.kind == kind), None)

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
