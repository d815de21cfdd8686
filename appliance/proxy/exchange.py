"""What one request did, for its metrics and its event (SPEC: no prompt or completion text in events)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance.events.sink import EventSink
from appliance.metrics import proxy as metrics
from appliance.policy._requestpath import Admission
from appliance.shared.admission import Ticket

#: Probes need no key and emit no event (a load balancer polls them several times a second).
PROBES = frozenset({"/health", "/livez", "/health/models/{name:path}"})
#: The per-model health checks' paths start with this (no key needed, as for the other probes).
MODEL_HEALTH = "/health/models/"
USAGE_BODY_LIMIT = 1 << 20
STREAM_TAIL = 8192
STREAM_HEAD = 2048
# OpenAI (chat, completions), Responses and Anthropic name their token counts differently.
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens")
# A usage (or timings) object holds numbers and objects of numbers ("prompt_tokens_details": {...}): one level of
# nesting.
_OBJECT = re.compile(rb'\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')


@dataclass
class Exchange:
    """Never holds prompt or completion text past the request."""

    request_id: str
    t0: float
    route: str = "other"
    model: str = ""
    #: The API key's name ("anonymous" without keys, "unauthenticated" when the key was refused).
    client: str = "anonymous"
    status: int = 0
    #: The body forwarded to the model (None: none was, the request ended before a model was chosen).
    request_bytes: int | None = None
    headers_s: float = 0.0
    stream: bool = False
    relayed: bool = False
    bytes_out: int = 0
    events: int = 0
    first_event_s: float | None = None
    #: Time spent waiting for an on-demand model to be loaded.
    load_wait_s: float | None = None
    #: The JSON body (bounded) or a stream's last STREAM_TAIL bytes or more, only to read "usage" at the end.
    kept: bytearray = field(default_factory=bytearray)
    #: A stream's first bytes: Anthropic's stream gives the prompt's tokens only in its first event.
    head: bytes = b""
    #: Admitted by its client's policy and the model's queue bound, and sent on: it counts in the client's usage.
    forwarded: bool = False
    #: Its client's policy admission, while it counts against the client.
    admission: Admission | None = None
    #: Its place in the model's admission queue, then its slot.
    ticket: Ticket | None = None
    #: Time spent in the admission queue, when every slot of the model was busy.
    queue_wait_s: float | None = None
    _usage: dict[str, Any] | None = None

    def keep(self, chunk: bytes) -> None:
        if self.stream:
            if len(self.head) < STREAM_HEAD:
                self.head += chunk[:STREAM_HEAD]
            # Once per SSE event: an append, and a cut only now and then.
            self.kept += chunk
            if len(self.kept) > 2 * STREAM_TAIL:
                del self.kept[:-STREAM_TAIL]
        elif len(self.kept) < USAGE_BODY_LIMIT:
            self.kept += chunk

    def _last_usage(self) -> dict[str, Any] | None:
        """The last ``"usage": {...}`` object in what was kept, read once for the event and the ledger."""
        if self._usage is None:
            self._usage = _last_object(self.kept, b'"usage":') or {}
        return self._usage or None

    def usage(self) -> dict[str, Any] | None:
        """The last usage object, with the token counts only."""
        usage = self._last_usage()
        return None if usage is None else {k: v for k, v in usage.items() if k in _USAGE_KEYS}

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens of the response, as llama-server counted them; (0, 0) when it says none.

        The prompt's tokens include those read from the cache: OpenAI's ``prompt_tokens`` does, Anthropic's
        ``input_tokens`` does not (``cache_read_input_tokens`` holds the rest). Streams of OpenAI's chat and text
        completions have no usage unless the client asks for it, but their last event has llama-server's timings."""
        usage = self._last_usage()
        if usage is not None:
            if "prompt_tokens" in usage or "completion_tokens" in usage:
                return _int(usage, "prompt_tokens"), _int(usage, "completion_tokens")
            if "output_tokens" in usage:
                start = usage if "input_tokens" in usage else (_first_object(self.head, b'"usage":') or {})
                prompt = sum(_int(start, k) for k in ("input_tokens", "cache_read_input_tokens",
                                                      "cache_creation_input_tokens"))
                return prompt, _int(usage, "output_tokens")
        timings = _last_object(self.kept, b'"timings":')
        if timings is not None:
            return _int(timings, "cache_n") + _int(timings, "prompt_n"), _int(timings, "predicted_n")
        return 0, 0


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _decode(data: bytes | bytearray, at: int) -> dict[str, Any] | None:
    """The ``{...}`` object after the key found at ``at``, decoded alone (not the whole body).

    Inside JSON strings quotes are escaped, so an unescaped key cannot come from generated text."""
    found = _OBJECT.match(data, data.index(b":", at) + 1)
    if found is None:  # null, or cut off
        return None
    try:
        doc = orjson.loads(found[1])
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _last_object(data: bytes | bytearray, key: bytes) -> dict[str, Any] | None:
    at = data.rfind(key)
    return None if at < 0 else _decode(data, at)


def _first_object(data: bytes, key: bytes) -> dict[str, Any] | None:
    at = data.find(key)
    return None if at < 0 else _decode(data, at)


def finish(events: EventSink, ex: Exchange) -> None:
    """Record the metrics that need the whole response, and emit the request's event."""
    total = time.perf_counter() - ex.t0
    metrics.observe(metrics.DURATION_SECONDS, total, ex.route, ex.model)
    metrics.add(metrics.RESPONSE_BYTES, ex.bytes_out, ex.route, ex.model)
    if ex.stream:
        metrics.observe(metrics.STREAM_EVENTS, ex.events, ex.model)
        if ex.first_event_s is not None:
            metrics.observe(metrics.FIRST_TOKEN_SECONDS, ex.first_event_s, ex.model)
    if ex.route in PROBES:
        return
    event: dict[str, Any] = {
        "ts": round(time.time(), 3), "event": "request", "request_id": ex.request_id, "route": ex.route,
        "model": ex.model or None, "client": ex.client, "status": ex.status, "stream": ex.stream,
        "headers_ms": round(ex.headers_s * 1000, 3), "total_ms": round(total * 1000, 3),
    }
    if ex.first_event_s is not None:
        event["first_token_ms"] = round(ex.first_event_s * 1000, 3)
    if ex.load_wait_s is not None:
        event["load_wait_ms"] = round(ex.load_wait_s * 1000, 3)
    if ex.queue_wait_s is not None:
        event["queue_wait_ms"] = round(ex.queue_wait_s * 1000, 3)
    usage = ex.usage() if ex.kept else None
    if usage:
        event["usage"] = usage
    events.emit(event)
