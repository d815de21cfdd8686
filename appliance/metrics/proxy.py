"""The proxy's own metrics, in prometheus-client multiprocess mode (one scrape adds up every gunicorn worker).

PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is first imported: the supervisord program sets it, and
``appliance.gunicorn_conf`` sets a default before anything imports this module. Prefix: ``appliance_``.

Buckets span LLM latencies, from a few milliseconds (an embedding, a cached prompt) to ten minutes (a long generation
on CPU).
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import Counter, Histogram

M = TypeVar("M", Counter, Histogram)
_children: dict[tuple[Any, ...], Any] = {}


def child(metric: M, *labels: str) -> M:
    """``metric.labels(*labels)``, remembered. labels() validates and locks on every call; the proxy sees few label
    values (routes, models, statuses, key names), so after the first request each is a dict look-up."""
    key = (metric, *labels)
    found: M | None = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found

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
# appliance_in_flight is read by the exporter from the proxy's own counters (appliance.proxy.hostload).
# Answered below the app (malformed or oversized heads, deadlines, the connection cap): no route, model or event.
HTTP_REFUSED = Counter("appliance_http_refused", "Requests refused by the HTTP layer before routing.", ["status"])
QUEUE_FULL = Counter("appliance_queue_full", "Requests refused with 429: parallel + max_queue already in flight.",
                     ["model"])
UPSTREAM_ERRORS = Counter("appliance_upstream_errors", "Failures talking to llama-server.", ["model", "kind"])
REQUEST_BYTES = Counter("appliance_request_bytes", "Request body bytes forwarded.", ["route", "model"])
RESPONSE_BYTES = Counter("appliance_response_bytes", "Response body bytes passed back.", ["route", "model"])
EVENTS_DROPPED = Counter("appliance_events_dropped", "Events dropped (queue full or collector down).", ["sink"])
