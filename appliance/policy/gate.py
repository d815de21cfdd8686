"""The clients' policies on the request path (``[clients.<name>]``): which models a key may use, how many of its
requests may be in flight on the host, and its request and token windows.

A client without limits pays one dictionary lookup; a client with any, one look at its ``windows.Window`` file (its
requests in flight, its windows and its day, in shared memory). Tokens are post-paid: they are known when the response
ends, so the request that crosses a token limit finishes and the next one is refused.
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
from appliance.policy.windows import BUSY, DAY_S, WINDOW_S, Usage, Window, client_file, day_start
from appliance.shared.hostload import HostLoad
from appliance.usage.ledger import LedgerError, ledger_path, tokens_since

log = logging.getLogger("appliance.policy")


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    headers: dict[str, str]
    #: The rate-limit header fields, raw for the response head (``RateFields``).
    head: bytes = b""


class _Limits:
    """A client's policy as the request path reads it: only clients with a limit have one."""

    __slots__ = ("concurrent", "day", "fields", "requests", "section", "tokens", "window")

    def __init__(self, p: ClientPolicy, section: str) -> None:
        self.section = section
        self.concurrent = p.max_concurrent
        self.requests, self.tokens, self.day = p.requests_per_minute, p.tokens_per_minute, p.tokens_per_day
        #: The rate-limit header fields: OpenAI's (index False), Anthropic's (True).
        self.fields = (RateFields(p, False), RateFields(p, True))
        #: Its requests in flight, its windows and its day (``Gate.start``).
        self.window: Window | None = None


class Admission:
    """A request let through by its client's policy; ``Gate.leave`` ends it. (A plain class with slots: one is made
    per request of a limited client, and a dataclass's construction costs twice as much.)"""

    __slots__ = ("at", "head", "window")

    def __init__(self, window: Window, at: float, head: bytes) -> None:
        self.window: Window | None = window
        self.at = at
        #: The rate-limit header fields of a client with minute windows, raw for the response head (``RateFields``).
        self.head = head


def _duration(seconds: float) -> str:
    """OpenAI's form of a reset time: ``6m0s``, ``59s``."""
    s = max(0, math.ceil(seconds))
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


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
        self._limits = {n: _Limits(p, self._sections[n]) for n, p in self._policies.items()
                        if p.max_concurrent or p.limited}

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

    def enter(self, client: str, anthropic: bool) -> Admission | Refusal | None:
        """Admit one request of ``client`` to a model, or say why not. None: the client has no limits."""
        limits = self._limits.get(client)
        if limits is None:
            return None
        window = limits.window
        assert window is not None
        now = time.time()
        counted = window.admit(now, limits.concurrent, limits.requests, limits.tokens, limits.day)
        if isinstance(counted, int):
            if counted == BUSY:
                return Refusal(429, "concurrency_limit_exceeded",
                               f"client {client!r} already has {limits.concurrent} requests in flight on this host "
                               f"(clients.{limits.section}.max_concurrent); retry when one has finished",
                               {"Retry-After": "1"})
            return self._refusal(client, limits, window.usage(now), now, anthropic)
        return Admission(window, now, limits.fields[anthropic].admitted(counted[0], counted[1], counted[2], now))

    def _refusal(self, client: str, limits: _Limits, usage: Usage, now: float, anthropic: bool) -> Refusal:
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

    def undo(self, admission: Admission) -> None:
        """The request was refused after all (the model's queue on the host was full): it does not count."""
        if admission.window is not None:
            admission.window.undo(admission.at)
        self.leave(admission)

    @staticmethod
    def leave(admission: Admission) -> None:
        window = admission.window
        if window is not None:
            admission.window = None
            window.leave()

    def charge(self, client: str, tokens: int) -> None:
        """Count a finished request's tokens in its client's windows (this worker's region: no lock)."""
        limits = self._limits.get(client)
        if limits is not None and limits.window is not None and tokens > 0:
            limits.window.charge(tokens, time.time())


#: The headers' names: OpenAI's, and Anthropic's on its routes; for requests, then tokens.
_NAMES = {
    False: ((b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests"),
            (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")),
    True: ((b"anthropic-ratelimit-requests-limit", b"anthropic-ratelimit-requests-remaining",
            b"anthropic-ratelimit-requests-reset"),
           (b"anthropic-ratelimit-tokens-limit", b"anthropic-ratelimit-tokens-remaining",
            b"anthropic-ratelimit-tokens-reset")),
}
#: OpenAI's reset durations within a window, by whole seconds.
_DURATIONS = tuple(_duration(s).encode() for s in range(WINDOW_S + 1))


class RateFields:
    """A client's rate-limit header fields: OpenAI's ``x-ratelimit-*``, or Anthropic's ``anthropic-ratelimit-*`` on
    its routes. What is left of the minute's requests and tokens after this request, and when each is whole again (a
    duration for OpenAI, a time for Anthropic).

    Rendered raw, for the response head (``appliance.proxy.protocol.CoalescedTransport.head_fields``): through Falcon
    and uvicorn, which encode and check every header one by one, six headers cost a limited client's request more than
    all its policy's checks."""

    __slots__ = ("_anthropic", "_requests", "_template", "_times", "_tokens", "_whole")

    def __init__(self, p: ClientPolicy, anthropic: bool) -> None:
        self._anthropic = anthropic
        self._requests = p.requests_per_minute
        self._tokens = p.tokens_per_minute
        #: The fields with the values left to fill in: the remaining requests and their reset, the remaining tokens
        #: and their reset (those of the limits the client has). ``_whole``: the same, for an admitted request of an
        #: OpenAI route, with its requests' reset filled in (the window is whole again in 60 s).
        self._template = self._whole = b""
        for limit, (name, remaining, reset), whole in zip((self._requests, self._tokens), _NAMES[anthropic],
                                                          (_DURATIONS[WINDOW_S], b"%s"), strict=True):
            if limit:
                self._template += b"%s: %d\r\n%s: %%d\r\n%s: %%s\r\n" % (name, limit, remaining, reset)
                self._whole += b"%s: %d\r\n%s: %%d\r\n%s: %s\r\n" % (name, limit, remaining, reset, whole)
        #: Anthropic's reset times, by second: a strftime costs more than the rest of the rendering.
        self._times: dict[int, bytes] = {}

    def render(self, requests: int, requests_reset_at: float, tokens: int, tokens_reset_at: float, now: float
               ) -> bytes:
        """The fields for a window with ``requests`` requests and ``tokens`` tokens (b"" without either limit)."""
        if self._requests and self._tokens:
            return self._template % (max(0, self._requests - requests), self._reset(requests_reset_at, now),
                                     max(0, self._tokens - tokens), self._reset(tokens_reset_at, now))
        if self._requests:
            return self._template % (max(0, self._requests - requests), self._reset(requests_reset_at, now))
        if self._tokens:
            return self._template % (max(0, self._tokens - tokens), self._reset(tokens_reset_at, now))
        return b""

    def admitted(self, requests: int, tokens: int, tokens_reset_at: float, now: float) -> bytes:
        """``render`` for an admitted request, the newest in the window: neither count is over its limit, and the
        requests' window is whole again 60 s from now. The OpenAI routes' case is the one that matters most."""
        if self._anthropic:
            return self.render(requests, int(now) + WINDOW_S, tokens, tokens_reset_at, now)
        if self._tokens:
            # The newest token's second is within the last 60 s: its reset is at most 60 s away.
            reset = _DURATIONS[min(WINDOW_S, math.ceil(tokens_reset_at - now))]
            if self._requests:
                return self._whole % (self._requests - requests, self._tokens - tokens, reset)
            return self._whole % (self._tokens - tokens, reset)
        if self._requests:
            return self._whole % (self._requests - requests)
        return b""

    def _reset(self, at: float, now: float) -> bytes:
        if self._anthropic:
            second = math.ceil(at)
            text = self._times.get(second)
            if text is None:
                if len(self._times) > 2 * WINDOW_S:
                    self._times.clear()
                text = self._times[second] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)).encode()
            return text
        s = max(0, math.ceil(at - now))
        return _DURATIONS[s] if s <= WINDOW_S else _duration(s).encode()
