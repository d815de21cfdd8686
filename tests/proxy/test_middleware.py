"""The middleware's accounting of a request: its metrics and its event are recorded once the response has been
written, not before (Falcon writes the response after ``process_response``, in the same step of the request's task).
That every request is still counted and has its event is proven against real servers (tests/metrics, tests/events)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

import falcon.asgi
import falcon.testing
from prometheus_client import REGISTRY

from appliance.proxy.exchange import Exchange
from appliance.proxy.middleware import Middleware
from appliance.proxy.runtime import Runtime

ROUTE = "/v1/embeddings"
LABELS = {"route": ROUTE, "model": "embed-m", "status": "200", "client": "team"}


class Events:
    def __init__(self) -> None:
        self.emitted: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.emitted.append(event)


def requests_counted() -> float:
    return REGISTRY.get_sample_value("appliance_requests_total", LABELS) or 0.0


def test_metrics_and_event_wait_until_the_response_has_been_written() -> None:
    events = Events()
    middleware = Middleware(cast(Runtime, SimpleNamespace(closing=False, events=events)))
    req = falcon.testing.create_asgi_req(method="POST", path=ROUTE)
    resp = falcon.asgi.Response()
    resp.status = 200
    resp.data = b'{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}'
    req.context.request_id = "req-1"
    req.context.cors_origin = None
    ex = req.context.exchange = Exchange("req-1", time.perf_counter(), route=ROUTE, model="embed-m", client="team")
    ex.request_bytes = 30
    ex.keep(resp.data)
    counted = requests_counted()

    async def main() -> None:
        await middleware.process_response(req, resp, None, True)
        assert resp.get_header("X-Request-Id") == "req-1"
        # Nothing recorded yet: the response is written next, and the client does not wait for its accounting.
        assert events.emitted == []
        assert requests_counted() == counted
        for _ in range(3):  # the accounting, then the flush of the metrics it added up
            await asyncio.sleep(0)

    asyncio.run(main())
    assert requests_counted() == counted + 1
    [event] = events.emitted
    assert event["request_id"] == "req-1"
    assert (event["route"], event["model"], event["client"], event["status"]) == (ROUTE, "embed-m", "team", 200)
    assert event["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
