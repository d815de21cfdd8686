"""The proxy's own metrics, in prometheus-client multiprocess mode (one scrape adds up every gunicorn worker).

PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is first imported: the supervisord program sets it, and
``appliance.gunicorn_conf`` sets a default before anything imports this module. Prefix: ``appliance_``.

Buckets span LLM latencies, from a few milliseconds (an embedding, a cached prompt) to ten minutes (a long generation
on CPU).
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Any

from prometheus_client import Counter, Histogram

_children: dict[tuple[Any, ...], Any] = {}


def _child(key: tuple[Any, ...]) -> Any:
    """``metric.labels(*labels)`` for ``key`` = (metric, *labels), remembered: labels() validates and locks on every
    call, and the proxy sees few label values (routes, models, statuses, key names)."""
    found = _children.get(key)
    if found is None:
        found = _children[key] = key[0].labels(*key[1:])
    return found


class _Pending:
    """Updates made since the last flush, added up.

    In multiprocess mode every ``inc`` or ``observe`` writes the worker's mmapped file (a histogram twice), which
    measured about a third of the proxy's own cost per request. The request path only adds up here; ``flush`` runs
    once per event-loop iteration (scheduled by the first update after the last one), so the files are current
    before the loop next waits, and one write covers every request that finished in the same iteration."""

    def __init__(self) -> None:
        self.counts: dict[tuple[Any, ...], float] = {}
        self.observed: dict[tuple[Any, ...], list[float]] = {}
        self.scheduled = False

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            try:
                asyncio.get_running_loop().call_soon(flush)
            except RuntimeError:  # no loop (a tool, a test): write now
                flush()


_pending = _Pending()


def add(metric: Counter, amount: float, *labels: str) -> None:
    """``metric.labels(*labels).inc(amount)``, written at the next flush."""
    key = (metric, *labels)
    counts = _pending.counts
    counts[key] = counts.get(key, 0.0) + amount
    _pending.schedule()


def observe(metric: Histogram, value: float, *labels: str) -> None:
    """``metric.labels(*labels).observe(value)``, written at the next flush."""
    key = (metric, *labels)
    values = _pending.observed.get(key)
    if values is None:
        _pending.observed[key] = [value]
    else:
        values.append(value)
    _pending.schedule()


def flush() -> None:
    """Write the pending updates (also called when the worker stops)."""
    counts, observed = _pending.counts, _pending.observed
    _pending.counts, _pending.observed, _pending.scheduled = {}, {}, False
    for key, amount in counts.items():
        _child(key).inc(amount)
    for key, values in observed.items():
        # Histogram.observe() per value would write the sum and a bucket each time; prometheus-client has no call for
        # several values, so its sum and bucket values are added to directly (what observe() does, once per bucket).
        histogram = _child(key)
        histogram._sum.inc(sum(values))
        buckets: dict[int, int] = {}
        for v in values:
            i = bisect.bisect_left(histogram._upper_bounds, v)
            buckets[i] = buckets.get(i, 0) + 1
        for i, n in buckets.items():
            histogram._buckets[i].inc(n)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
EVENT_COUNT_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# client: the API key's name (never the key), "anonymous" without keys, "unauthenticated" for a refused key.
REQUESTS = Counter("appliance_requests", "Requests answered by the proxy.", ["route", "model", "status", "client"])
HEADERS_SECONDS = Histogram("appliance_response_headers_seconds",
                            "Time from request received to response headers sent (time to first byte).",
                            ["route", "model"], buckets=LATENCY_BUCKETS)
DURATION_SECONDS = Histogram("appliance_request_duration_seconds",
                             "Time from request received to the last byte of the response.", ["route", "model"],
                             buckets=LATENCY_BUCKETS)
FIRST_TOKEN_SECONDS = Histogram("appliance_time_to_first_token_seconds",
                                "Streams: time from request received to the first SSE event.", ["model"],
                                buckets=LATENCY_BUCKETS)
STREAM_EVENTS = Histogram("appliance_stream_events", "Streams: SSE events passed through per response.", ["model"],
                          buckets=EVENT_COUNT_BUCKETS)
# appliance_in_flight is read by the exporter from the proxy's own counters (appliance.shared.hostload).
# Answered below the app (malformed or oversized heads, deadlines, the connection cap): no route, model or event.
HTTP_REFUSED = Counter("appliance_http_refused", "Requests refused by the HTTP layer before routing.", ["status"])
QUEUE_FULL = Counter("appliance_queue_full", "Requests refused with 429: parallel + max_queue already in flight.",
                     ["model"])
QUEUE_WAIT_SECONDS = Histogram("appliance_queue_wait_seconds", "Time a request waited in the proxy for one of the "
                               "model's slots (only requests that found every slot busy).", ["model"],
                               buckets=LATENCY_BUCKETS)
POLICY_REFUSED = Counter("appliance_policy_refused", "Requests refused with 429 by their client's policy "
                         "([clients.<name>]): its concurrency, request or token window, or daily budget.",
                         ["client", "code"])
UPSTREAM_ERRORS = Counter("appliance_upstream_errors", "Failures talking to llama-server.", ["model", "kind"])
REQUEST_BYTES = Counter("appliance_request_bytes", "Request body bytes forwarded.", ["route", "model"])
RESPONSE_BYTES = Counter("appliance_response_bytes", "Response body bytes passed back.", ["route", "model"])
EVENTS_DROPPED = Counter("appliance_events_dropped", "Events dropped (queue full or collector down).", ["sink"])
# Counted with the usage ledger (appliance.usage.ledger), per request forwarded to a model; direction: "prompt" or
# "completion".
TOKENS = Counter("appliance_tokens", "Prompt and completion tokens of the requests forwarded to a model, as "
                 "llama-server counted them.", ["client", "model", "direction"])
