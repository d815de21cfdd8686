"""The clients' policies on the request path (``[clients.<name>]``): which models a key may use, how many of its
requests may be in flight on the host, and its request and token windows.

A client without limits pays one dictionary lookup; a client with any, one compiled call (``_requestpath.Limits``) that
looks at its ``windows.Window`` file (its requests in flight, its windows and its day, in shared memory) and renders its
rate-limit header fields, and one that charges its tokens. A refusal, the rare case, is explained here. Tokens are
post-paid: they are known when the response ends, so the request that crosses a token limit finishes and the next one
is refused.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.config import DEFAULT_CLIENT, UNLIMITED, ApplianceConfig, ClientPolicy, ModelConfig
from appliance.policy import clients_dir, concurrency_dir
from appliance.policy._requestpath import Client, Limits
from appliance.policy.windows import BUSY, DAY_S, WINDOW_S, Window, client_file, day_start
from appliance.shared.hostload import HostLoad
from appliance.usage.ledger import LedgerError, ledger_path, tokens_since

log = logging.getLogger("appliance.policy")


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    headers: dict[str, str]
    #: The rate-limit header fields, raw for the response head (``_requestpath.RateFields``).
    head: bytes = b""


class Gate:
    def __init__(self, cfg: ApplianceConfig, clients: Iterable[str]) -> None:
        self.cfg = cfg
        names = tuple(clients)
        self._policies: dict[str, ClientPolicy] = {n: cfg.policy(n) for n in names}
        self._sections = {n: n if n in cfg.clients else DEFAULT_CLIENT for n in names}
        self._allowed: dict[str, frozenset[str] | None] = {}
        self._visible: dict[str, frozenset[str] | None] = {}
        for n, p in self._policies.items():
            if p.models is None:
                self._allowed[n] = self._visible[n] = None
                continue
            models = [m for m in cfg.models if {m.name, *m.aliases} & set(p.models)]
            self._allowed[n] = frozenset(m.name for m in models)
            self._visible[n] = frozenset(p.models) | {a for m in models for a in (m.name, *m.aliases)}
        #: Only for this worker's slot, the region it writes in the clients' files.
        self._slots = HostLoad(concurrency_dir(cfg), ())
        #: The clients with a limit: a request of any other pays one dictionary lookup.
        self._limits = {n: Client(self._sections[n], p.max_concurrent, p.requests_per_minute, p.tokens_per_minute,
                                  p.tokens_per_day)
                        for n, p in self._policies.items() if p.max_concurrent or p.limited}
        path = Limits(self._limits, self._refusal)
        #: ``enter(client, anthropic)``: admit one request of ``client`` to a model (an ``Admission``), or say why not
        #: (a ``Refusal``); None: the client has no limits. ``charge(client, tokens)``: count a finished request's
        #: tokens in its client's windows. Both compiled: they are on every request.
        self.enter = path.enter
        self.charge = path.charge

    def start(self) -> None:
        """Claim this worker's slot (its region in the clients' files) and map the files, their day no lower than the
        ledger's count."""
        self._slots.start()
        spent: dict[str, int] | None = None

        def seed(client: str) -> int:
            nonlocal spent
            if spent is None:
                try:
                    spent = tokens_since(ledger_path(self.cfg), day_start(time.time()))
                except LedgerError as e:
                    # Serving matters more than a day's budget: the day starts from 0, and the operator is told.
                    log.warning("daily token budgets start from 0: the usage ledger cannot be read: %s", e)
                    spent = {}
            return spent.get(client, 0)

        for n, limits in self._limits.items():
            limits.window = Window(client_file(clients_dir(self.cfg), n), self._slots.slot, self._slots.high_reader(),
                                   functools.partial(seed, n))

    def policy(self, client: str) -> ClientPolicy:
        return self._policies.get(client, UNLIMITED)

    def allows(self, client: str, model: ModelConfig) -> bool:
        allowed = self._allowed.get(client)
        return allowed is None or model.name in allowed

    def visible(self, client: str) -> frozenset[str] | None:
        """Every name (model names and aliases) a client may use, or None for all."""
        return self._visible.get(client)

    def _refusal(self, client: str, code: int, now: float, anthropic: bool) -> Refusal:
        limits = self._limits[client]
        if code == BUSY:
            return Refusal(429, "concurrency_limit_exceeded",
                           f"client {client!r} already has {limits.concurrent} requests in flight on this host "
                           f"(clients.{limits.section}.max_concurrent); retry when one has finished",
                           {"Retry-After": "1"})
        assert isinstance(limits.window, Window)
        usage = limits.window.usage(now)
        p, section = self._policies[client], limits.section
        reasons: list[tuple[float, str]] = []
        if p.tokens_per_day and usage.day_tokens >= p.tokens_per_day:
            reasons.append((day_start(now) + DAY_S, f"has used {usage.day_tokens} tokens today (UTC), its budget is "
                            f"{p.tokens_per_day} (clients.{section}.tokens_per_day); it renews at 00:00 UTC"))
        if p.requests_per_minute and usage.requests >= p.requests_per_minute:
            reasons.append((usage.room_at(p.requests_per_minute, False, now),
                            f"has made {usage.requests} requests in the last {WINDOW_S} s, its limit is "
                            f"{p.requests_per_minute} (clients.{section}.requests_per_minute)"))
        if p.tokens_per_minute and usage.tokens >= p.tokens_per_minute:
            reasons.append((usage.room_at(p.tokens_per_minute, True, now),
                            f"has used {usage.tokens} tokens in the last {WINDOW_S} s, its limit is "
                            f"{p.tokens_per_minute} (clients.{section}.tokens_per_minute)"))
        # The window may have made room since the refused look: then retry at once.
        at, why = max(reasons, default=(now, "was over a limit a moment ago"))
        wait = max(1, math.ceil(at - now))
        budget = p.tokens_per_day and usage.day_tokens >= p.tokens_per_day
        head = limits.fields[anthropic].render(usage.requests, usage.requests_reset_at, usage.tokens,
                                               usage.tokens_reset_at, now)
        headers = {"Retry-After": str(wait)}
        if budget:
            # The SDKs would retry a 429 within seconds; a budget renews in hours.
            headers["x-should-retry"] = "false"
        return Refusal(429, "daily_token_budget_exceeded" if budget else "rate_limit_exceeded",
                       f"client {client!r} {why}; retry in {wait} s", headers, head)
