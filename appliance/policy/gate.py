"""The clients' policies on the request path (``[clients.<name>]``): which models a key may use, how many of its
requests may be in flight on the host, and its request and token windows.

A client without limits pays one dictionary lookup. Concurrency is counted like the models' queue bound (per-worker
counters in shared memory, dropped with a dead worker); the windows are ``windows.Window`` files. Tokens are post-paid:
they are known when the response ends, so the request that crosses a token limit finishes and the next one is refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.config import DEFAULT_CLIENT, UNLIMITED, ApplianceConfig, ClientPolicy, ModelConfig
from appliance.policy import clients_dir, concurrency_dir
from appliance.policy.windows import DAY_S, WINDOW_S, Usage, Window, client_file, day_start
from appliance.shared.hostload import HostLoad
from appliance.usage.ledger import LedgerError, ledger_path, tokens_since

log = logging.getLogger("appliance.policy")


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    headers: dict[str, str]


class Admission:
    """A request let through by its client's policy; ``Gate.leave`` ends it. (A plain class with slots: one is made
    per request of a limited client, and a dataclass's construction costs twice as much.)"""

    __slots__ = ("at", "client", "concurrent", "headers", "window")

    def __init__(self, client: str, concurrent: bool, at: float) -> None:
        self.client = client
        self.window: Window | None = None
        self.concurrent = concurrent
        self.at = at
        #: The rate-limit headers of a client with windows, for the response.
        self.headers: list[tuple[str, str]] = []


def _duration(seconds: float) -> str:
    """OpenAI's form of a reset time: ``6m0s``, ``59s``."""
    s = max(0, math.ceil(seconds))
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def _rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(at)))


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
        self._concurrency = HostLoad(concurrency_dir(cfg), [n for n, p in self._policies.items() if p.max_concurrent])
        self._windows: dict[str, Window] = {}
        #: Tokens of this worker's ended requests not yet in their clients' windows (``charge``).
        self._unpaid: dict[str, int] = {}
        self._paying = False

    def start(self) -> None:
        """Claim this worker's slot (its concurrency counters and its regions of the windows) and map the windows,
        their day no lower than the ledger's count."""
        self._concurrency.start()
        limited = [n for n, p in self._policies.items() if p.limited]
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

        for n in limited:
            self._windows[n] = Window(client_file(clients_dir(self.cfg), n), self._concurrency.slot,
                                      lambda: self._concurrency.high, functools.partial(seed, n))

    def policy(self, client: str) -> ClientPolicy:
        return self._policies.get(client, UNLIMITED)

    def allows(self, client: str, model: ModelConfig) -> bool:
        allowed = self._allowed.get(client)
        return allowed is None or model.name in allowed

    def visible(self, client: str) -> frozenset[str] | None:
        """Every name (model names and aliases) a client may use, or None for all."""
        return self._visible.get(client)

    def enter(self, client: str, anthropic: bool) -> Admission | Refusal | None:
        """Admit one request of ``client`` to a model, or say why not. None: the client has no limits."""
        p = self._policies.get(client, UNLIMITED)
        if not (p.max_concurrent or p.limited):
            return None
        section = self._sections.get(client, DEFAULT_CLIENT)
        concurrent = False
        if p.max_concurrent:
            if not self._concurrency.try_enter(client, p.max_concurrent):
                return Refusal(429, "concurrency_limit_exceeded",
                               f"client {client!r} already has {p.max_concurrent} requests in flight on this host "
                               f"(clients.{section}.max_concurrent); retry when one has finished",
                               {"Retry-After": "1"})
            concurrent = True
        admission = Admission(client, concurrent, time.time())
        if not p.limited:
            return admission
        window = admission.window = self._windows[client]
        if client in self._unpaid:  # this worker's requests that ended just now count first
            window.charge(self._unpaid.pop(client), admission.at)
        now = admission.at
        counted = window.admit(now, p.requests_per_minute, p.tokens_per_minute, p.tokens_per_day)
        if counted is None:
            if concurrent:
                self._concurrency.leave(client)
            return self._refusal(client, section, p, window.usage(now), now, anthropic)
        requests, tokens, tokens_reset_at = counted
        admission.headers = _rate_headers(p, requests, int(now) + WINDOW_S, tokens, tokens_reset_at, now, anthropic)
        return admission

    def _refusal(self, client: str, section: str, p: ClientPolicy, usage: Usage, now: float, anthropic: bool
                 ) -> Refusal:
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
        headers = dict(_rate_headers(p, usage.requests, usage.requests_reset_at, usage.tokens, usage.tokens_reset_at,
                                     now, anthropic))
        headers["Retry-After"] = str(wait)
        if budget:
            # The SDKs would retry a 429 within seconds; a budget renews in hours.
            headers["x-should-retry"] = "false"
        return Refusal(429, "daily_token_budget_exceeded" if budget else "rate_limit_exceeded",
                       f"client {client!r} {why}; retry in {wait} s", headers)

    def undo(self, admission: Admission) -> None:
        """The request was refused after all (the model's queue on the host was full): it does not count."""
        if admission.window is not None:
            admission.window.undo(admission.at)
        self.leave(admission)

    def leave(self, admission: Admission) -> None:
        if admission.concurrent:
            admission.concurrent = False
            self._concurrency.leave(admission.client)

    def charge(self, client: str, tokens: int) -> None:
        """Count a finished request's tokens in its client's windows: at the end of this event-loop iteration, once
        for every request of the client that ended in it (one lock, not one per request), and before the client's
        next request here."""
        if tokens <= 0 or client not in self._windows:
            return
        self._unpaid[client] = self._unpaid.get(client, 0) + tokens
        if not self._paying:
            self._paying = True
            try:
                asyncio.get_running_loop().call_soon(self.pay)
            except RuntimeError:  # no loop (a tool, a test): now
                self.pay()

    def pay(self) -> None:
        """Charge what the ended requests owe (also when the worker stops)."""
        self._paying = False
        unpaid, self._unpaid = self._unpaid, {}
        now = time.time()
        for client, tokens in unpaid.items():
            self._windows[client].charge(tokens, now)


#: The headers' names: OpenAI's, and Anthropic's on its routes; for requests, then tokens.
_NAMES = {
    False: (("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
            ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")),
    True: (("anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset"),
           ("anthropic-ratelimit-tokens-limit", "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-tokens-reset")),
}


def _rate_headers(p: ClientPolicy, requests: int, requests_reset_at: float, tokens: int, tokens_reset_at: float,
                  now: float, anthropic: bool) -> list[tuple[str, str]]:
    """OpenAI's ``x-ratelimit-*`` headers, or Anthropic's ``anthropic-ratelimit-*`` on its routes: what is left of the
    minute's requests and tokens after this request, and when each is whole again (a duration for OpenAI, a time for
    Anthropic)."""
    out: list[tuple[str, str]] = []
    names = _NAMES[anthropic]
    if p.requests_per_minute:
        limit, remaining, reset = names[0]
        out += ((limit, str(p.requests_per_minute)), (remaining, str(max(0, p.requests_per_minute - requests))),
                (reset, _rfc3339(requests_reset_at) if anthropic else _duration(requests_reset_at - now)))
    if p.tokens_per_minute:
        limit, remaining, reset = names[1]
        out += ((limit, str(p.tokens_per_minute)), (remaining, str(max(0, p.tokens_per_minute - tokens))),
                (reset, _rfc3339(tokens_reset_at) if anthropic else _duration(tokens_reset_at - now)))
    return out
