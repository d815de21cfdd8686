"""A bounded load through the OpenAI SDK for the fleet tests: a few clients, each a closed loop over streaming chat
completions, non-streaming chat completions and embeddings, recording every request's outcome.

Each client uses the SDK's defaults (2 retries of connection errors, 408/409/429 and 5xx, honouring Retry-After), as
an application would; the responses it retried are counted separately. Every loop stops by itself: after
`max_requests` requests per client or `max_seconds`, whichever comes first, or when `stop()` is called.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

KINDS = ("stream", "chat", "embed")


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    ok: bool
    error: str = ""
    truncated: bool = False  # a stream that ended without its finish_reason
    host: str = ""  # the host of the final response (the load balancer's served-by header)
    retried: list[int] = field(default_factory=list)  # statuses of the responses the SDK retried


@dataclass
class Load:
    base_url: str  # .../v1
    api_key: str
    chat_model: str
    embed_model: str
    clients: int = 3
    max_requests: int = 2000
    max_seconds: float = 900.0
    stream_tokens: int = 24
    chat_tokens: int = 12
    host_header: str = "x-appliance-host"
    #: What each client sends, in turns (a subset of KINDS).
    kinds: tuple[str, ...] = KINDS
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(180)
        assert not any(t.is_alive() for t in self._threads), "a load client did not stop"
        return list(self.outcomes)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        """Until n requests have completed (the load is under way)."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(self.outcomes) >= n, f"only {len(self.outcomes)} requests in {timeout} s: {summary(self.outcomes)}"

    def _client(self, index: int) -> None:
        local: dict[str, Any] = {"statuses": [], "host": ""}

        def on_response(response: httpx.Response) -> None:
            local["statuses"].append(response.status_code)
            local["host"] = response.headers.get(self.host_header, "")

        client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=120,
                               http_client=openai.DefaultHttpxClient(event_hooks={"response": [on_response]}))
        deadline = time.monotonic() + self.max_seconds
        with client:
            for i in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                kind = self.kinds[(index + i) % len(self.kinds)]
                local["statuses"], local["host"] = [], ""
                out = self._one(client, kind, index, i)
                out.host = local["host"]
                out.retried = local["statuses"][:-1]  # every response but the last was retried
                with self._lock:
                    self.outcomes.append(out)

    def _one(self, client: openai.OpenAI, kind: str, index: int, i: int) -> Outcome:
        start = time.time()
        messages: Any = [{"role": "user", "content": f"Client {index}, request {i}: say something."}]
        try:
            if kind == "stream":
                finish = None
                stream = client.chat.completions.create(model=self.chat_model, messages=messages, stream=True,
                                                        max_tokens=self.stream_tokens)
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                return Outcome(kind, start, time.time(), ok=finish is not None, truncated=finish is None,
                               error="" if finish else "stream ended without a finish_reason")
            if kind == "chat":
                chat = client.chat.completions.create(model=self.chat_model, messages=messages,
                                                      max_tokens=self.chat_tokens)
                ok = bool(chat.choices) and chat.choices[0].finish_reason is not None
                return Outcome(kind, start, time.time(), ok=ok, error="" if ok else f"no choice: {chat}")
            emb = client.embeddings.create(model=self.embed_model, input=f"client {index} request {i}")
            ok = bool(emb.data) and len(emb.data[0].embedding) > 0
            return Outcome(kind, start, time.time(), ok=ok, error="" if ok else "empty embedding")
        except (openai.OpenAIError, httpx.HTTPError) as e:
            # A stream that broke after its headers is a truncated stream, whatever the SDK raised.
            return Outcome(kind, start, time.time(), ok=False, truncated=kind == "stream",
                           error=f"{type(e).__name__}: {str(e)[:300]}")


def summary(outcomes: list[Outcome]) -> str:
    """One line: counts by kind, failures, truncated streams, retried responses by status, hosts served by."""
    kinds = Counter(o.kind for o in outcomes)
    failed = Counter(o.kind for o in outcomes if not o.ok)
    retried = Counter(s for o in outcomes for s in o.retried)
    hosts = Counter(o.host or "?" for o in outcomes if o.ok)
    truncated = sum(o.truncated for o in outcomes)
    return (f"{len(outcomes)} requests ({', '.join(f'{k} {kinds[k]}' for k in KINDS)}), "
            f"{sum(failed.values())} failed ({', '.join(f'{k} {failed[k]}' for k in KINDS)}), "
            f"{truncated} truncated streams, SDK-retried responses {dict(retried) or 0}, served by {dict(hosts)}")
