"""What every request goes through: its id, its accounting, the API key, CORS, and the lifespan hooks."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import MutableMapping
from typing import Any

import falcon
import falcon.asgi

from appliance.metrics import proxy as metrics
from appliance.proxy.errors import ApiError
from appliance.proxy.exchange import MODEL_HEALTH, PROBES, Exchange, finish
from appliance.proxy.protocol import REQUEST_ID
from appliance.proxy.runtime import Runtime

# Browsers may read these on a cross-origin response (the rest of the headers stay hidden from page scripts).
_EXPOSED = "X-Request-Id, Retry-After"
_CORS_MAX_AGE = "600"


class Middleware:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        #: Requests answered since the last ``_account``: their responses are being written.
        self._answered: list[Exchange] = []

    async def process_startup(self, scope: MutableMapping[str, Any], event: Any) -> None:
        self.rt.load.start()
        self.rt.gate.start()
        self.rt.fair.start()
        await self.rt.usage.start()
        await self.rt.upstream.start()
        await self.rt.events.start()
        await self.rt.readiness.start()
        # Whatever exists now (modules, config, the app) lives as long as the worker: out of the collector's sight, a
        # collection only walks what requests allocate.
        gc.freeze()

    async def process_shutdown(self, scope: MutableMapping[str, Any], event: Any) -> None:
        metrics.flush()
        self.rt.deadlines.stop()
        self.rt.fair.stop()
        await self.rt.readiness.stop()
        await self.rt.events.stop()
        await self.rt.usage.stop()
        await self.rt.upstream.close()

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rt = self.rt
        incoming = req.get_header("x-request-id")
        req.context.request_id = incoming if incoming and REQUEST_ID.match(incoming) else os.urandom(16).hex()
        ex = req.context.exchange = Exchange(req.context.request_id, time.perf_counter())
        req.context.cors_origin = None
        if rt.cors_origins and (origin := req.get_header("origin")):
            req.context.cors_origin = rt.cors_origin(origin)
            if req.method == "OPTIONS" and req.get_header("access-control-request-method"):
                # A preflight never carries a key: answer it here, before authentication. An origin that is not
                # allowed gets no Access-Control-* header, and the browser stops there.
                if req.context.cors_origin is not None:
                    resp.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
                    resp.set_header("Access-Control-Allow-Headers",
                                    req.get_header("access-control-request-headers") or "*")
                    resp.set_header("Access-Control-Max-Age", _CORS_MAX_AGE)
                ex.route = "preflight"
                resp.status = 200
                resp.complete = True
                return
        if rt.keys and req.path not in PROBES:
            name = self._client(req)
            if name is not None:
                ex.client = name
            # The per-model probes are open too; their paths vary, so they are told apart only here, off the path
            # of requests that carry a key.
            elif not req.path.startswith(MODEL_HEALTH):
                ex.client = "unauthenticated"
                raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>' or "
                               "'x-api-key: <key>'", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def _client(self, req: falcon.asgi.Request) -> str | None:
        """The name of the key the request carries, as a Bearer token (OpenAI clients) or x-api-key (Anthropic)."""
        auth = req.get_header("authorization")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            return self.rt.key_name(token.strip().encode())
        key = req.get_header("x-api-key")
        return self.rt.key_name(key.strip().encode()) if key and key.strip() else None

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               req_succeeded: bool) -> None:
        resp.set_header("X-Request-Id", req.context.request_id)
        if self.rt.closing:
            resp.set_header("Connection", "close")
        if req.context.cors_origin is not None:
            resp.set_header("Access-Control-Allow-Origin", req.context.cors_origin)
            resp.set_header("Access-Control-Allow-Credentials", "true")
            resp.set_header("Access-Control-Expose-Headers", _EXPOSED)
            resp.set_header("Vary", "Origin")
        ex: Exchange = req.context.exchange
        if req.uri_template:  # the route that answered (Forward sets it itself, it needs it earlier)
            ex.route = req.uri_template
        ex.status = int(resp.status_code)
        ex.headers_s = time.perf_counter() - ex.t0
        if not ex.relayed:
            ex.bytes_out = len(resp.data or b"")
        # Falcon writes the response after this hook, in the same step of the request's task; the metrics and the
        # event wait until it has (at one connection they were a tenth of the time the proxy added to a request).
        # One callback for all the requests answered in the same event-loop iteration.
        answered = self._answered
        answered.append(ex)
        if len(answered) == 1:
            asyncio.get_running_loop().call_soon(self._account)

    def _account(self) -> None:
        answered, self._answered = self._answered, []
        events = self.rt.events
        for ex in answered:
            metrics.add(metrics.REQUESTS, 1, ex.route, ex.model, str(ex.status), ex.client)
            metrics.observe(metrics.HEADERS_SECONDS, ex.headers_s, ex.route, ex.model)
            if ex.request_bytes is not None:
                metrics.add(metrics.REQUEST_BYTES, ex.request_bytes, ex.route, ex.model)
            if not ex.relayed:
                finish(events, ex)
                if ex.forwarded:
                    self.rt.settle(ex)
