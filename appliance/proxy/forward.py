"""The one forwarding mechanism behind every served route (``routes.ROUTES``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import falcon
import falcon.asgi
import orjson

from appliance.config import ModelConfig
from appliance.lifecycle.client import ManagerUnavailable, wait_loaded
from appliance.metrics import proxy as metrics
from appliance.policy.gate import Refusal
from appliance.proxy.errors import ApiError
from appliance.proxy.exchange import Exchange, finish
from appliance.proxy.protocol import GONE_KEY, HEAD_KEY, RECEIVE_KEY
from appliance.proxy.relay import relay
from appliance.proxy.routes import Route, is_anthropic
from appliance.proxy.runtime import Runtime
from appliance.proxy.upstream import UpstreamError, UpstreamResponse
from appliance.shared.modelstate import READY

log = logging.getLogger("appliance.proxy")

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
# Request headers that reach llama-server, and only when the client sent them; everything else (the API key first of
# all) stays here.
UPSTREAM_HEADERS = ("content-type", "accept")
# Response headers passed back to the client besides the body.
DOWNSTREAM_HEADERS = ("content-type", "content-length", "content-encoding", "cache-control")
# Complete bodies up to this size (known Content-Length, not SSE) are sent in one piece: llama-server writes them at
# once, and one send instead of a chunk relay halves the proxy's per-request cost on small (embedding) responses.
INLINE_BODY_MAX = 256 * 1024
# What a client is told about a failed connection to a model; the details (addresses, library errors) go to the log.
_FAILURES = {
    "refused": "refused the connection (it is probably restarting)",
    "reset": "closed the connection without answering",
}


async def read_body(req: falcon.asgi.Request, receive: Receive, limit: int) -> bytes:
    """The whole request body, straight from the ASGI channel rather than Falcon's stream, which takes a client that
    left for the end of the body: a truncated body is never forwarded (llama-server might run it), it ends the request
    as a client abort (499). (A Content-Length over the limit never gets here: the HTTP layer answers it.)"""
    # Falcon has already received the first event (to see whether the client is still there) and keeps it here.
    message: Mapping[str, Any] | None = req._first_event
    if message is None:
        raise RuntimeError("falcon.asgi.Request no longer keeps its first ASGI event in _first_event")
    parts: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise ApiError(499, "client closed the connection before sending the whole request body", "client_closed")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            break
        message = await receive()
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than the limit of {limit} bytes (server.body_limit_bytes)",
                    "request_too_large", {"Connection": "close"})


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        message = str(e)
        if message.startswith("depth limit exceeded"):
            raise ApiError(400, "request body is nested too deeply to be read", "invalid_json") from None
        if message.startswith("number is infinity"):
            message = "it holds a number too large to be read"
        raise ApiError(400, f"request body is not valid JSON: {message}", "invalid_json") from None


class Forward:
    """POST ``route.path``: to the model the body names, verbatim both ways."""

    def __init__(self, rt: Runtime, route: Route) -> None:
        self.rt = rt
        self.route = route
        #: Anthropic's routes get Anthropic's rate-limit headers.
        self.anthropic = is_anthropic(route.path)

    def _model(self, doc: Any, client: str) -> ModelConfig:
        if not isinstance(doc, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_json")
        name = doc.get("model")
        kinds = self.route.kinds
        gate = self.rt.gate
        if name is None or name == "":
            model = self.rt.default_model(kinds[0], gate.visible(client))
            if model is None:
                raise ApiError(404, f"no {kinds[0]} model is configured; name one in \"model\"", "model_not_found")
            return model
        if not isinstance(name, str):
            raise ApiError(400, "\"model\" must be a string", "invalid_model")
        model = self.rt.names.get(name) or self.rt.match_pattern(name)
        if model is None or not gate.allows(client, model):
            # A model the client may not use is one it does not learn of.
            visible = gate.visible(client)
            known = ", ".join(sorted(n for n in self.rt.names if visible is None or n in visible))
            raise ApiError(404, f"model {name!r} does not exist; available: {known}", "model_not_found")
        if model.kind not in kinds:
            raise ApiError(400, f"model {name!r} is a {model.kind} model and cannot serve {self.route.path} "
                           f"(that takes a {' or '.join(kinds)} model)", "wrong_model_kind")
        return model

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rt = self.rt
        if rt.draining:
            raise ApiError(503, "this server is shutting down; retry (another host)", "draining", {"Retry-After": "1"})
        receive: Receive = req.scope[RECEIVE_KEY]
        body = await read_body(req, receive, rt.cfg.server.body_limit_bytes)
        await self._forward(req, resp, self._model(parse_json(body), req.context.exchange.client), "POST", body)

    async def _forward(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, model: ModelConfig, method: str,
                       body: bytes) -> None:
        rt = self.rt
        ex: Exchange = req.context.exchange
        ex.route = self.route.path
        ex.model = model.name
        ex.request_bytes = len(body)
        if not model.on_demand and not rt.readiness.is_ready(model):
            state = rt.readiness.models[model.name].state
            raise ApiError(503, f"model {model.name!r} is not ready ({state}); retry shortly", "model_not_ready",
                           {"Retry-After": "2"})
        admission = rt.gate.enter(ex.client, self.anthropic)
        if isinstance(admission, Refusal):
            metrics.POLICY_REFUSED.labels(ex.client, admission.code).inc()
            req.scope[HEAD_KEY].head_fields = admission.head
            raise ApiError(admission.status, admission.message, admission.code, admission.headers)
        # An on-demand model's request counts as in flight before its state is read (appliance.shared.modelstate).
        if not rt.try_enter(model):
            if admission is not None:
                admission.undo()
            metrics.QUEUE_FULL.labels(model.name).inc()
            raise ApiError(429, f"model {model.name!r} has {model.queue_limit} requests in flight on this host "
                           "(parallel + max_queue); retry shortly", "rate_limit_exceeded", {"Retry-After": "1"})
        ex.forwarded = True
        if admission is not None:
            ex.admission = admission
            req.scope[HEAD_KEY].head_fields = admission.head
        headers = {h: v for h in UPSTREAM_HEADERS if (v := req.get_header(h))}
        headers["x-request-id"] = req.context.request_id
        disconnect: asyncio.Future[None] = req.scope[GONE_KEY]()
        rt.watches.add(disconnect)
        handed_over = False
        try:
            while model.on_demand and rt.model_states.get(model.name) != READY:
                # Waiting, the request holds no memory: it must not keep a closing model from being unloaded.
                rt.load.leave(model.name)
                try:
                    await self._wait_loaded(model, ex, disconnect)
                finally:
                    rt.load.enter(model.name)
            await self._take_slot(model, ex, disconnect)
            up = await self._send(model, method, body, headers, disconnect, req.context.request_id)
            resp.status = up.status
            for h in DOWNSTREAM_HEADERS:
                if (v := up.headers.get(h)) is not None:
                    resp.set_header(h, v)
            ex.stream = up.headers.get("content-type", "").startswith("text/event-stream")
            length = up.headers.get("content-length", "")
            if not ex.stream and length.isdigit() and int(length) <= INLINE_BODY_MAX:
                try:
                    data = await up.read()
                except UpstreamError as e:
                    up.close()
                    metrics.UPSTREAM_ERRORS.labels(model.name, "reset").inc()
                    log.warning("request %s: model %s broke the connection: %s", ex.request_id, model.name, e)
                    raise ApiError(502, f"model {model.name!r} broke the connection while answering",
                                   "upstream_error") from None
                ex.keep(data)
                resp.data = data
            else:
                ex.relayed = True
                resp.stream = relay(up, disconnect, ex, lambda: self._done(model, ex, disconnect))
                handed_over = True
        finally:
            if not handed_over:
                disconnect.cancel()
                rt.watches.discard(disconnect)
                rt.leave(model, ex)

    async def _take_slot(self, model: ModelConfig, ex: Exchange, disconnect: asyncio.Future[None]) -> None:
        """One of the model's slots, at once while one is free; else after the requests of other clients ahead of it
        in the fair order (``appliance.shared.admission``)."""
        rt = self.rt
        ticket = ex.ticket = rt.fair.enter(model.name, ex.client, rt.gate.policy(ex.client).weight)
        if ticket.ready is None:
            return
        granted = await rt.fair.wait(ticket, disconnect)
        ex.queue_wait_s = ticket.waited_s
        metrics.observe(metrics.QUEUE_WAIT_SECONDS, ticket.waited_s, model.name)
        if not granted:
            if disconnect.cancelled():
                raise ApiError(503, "this server is shutting down and its grace period is over; retry (another "
                               "host)", "draining", {"Retry-After": "1"})
            raise ApiError(499, "client closed the request", "client_closed")

    async def _wait_loaded(self, model: ModelConfig, ex: Exchange, disconnect: asyncio.Future[None]) -> None:
        """Wait for the model manager to load ``model``. The caller has uncounted the request meanwhile and counts it
        again before it reads the model's state anew: only then may it be forwarded."""
        # The manager answers at load_timeout_s, naming what holds the memory; the margin lets its answer arrive.
        timeout = self.rt.cfg.server.load_timeout_s + 2.0
        t0 = time.perf_counter()
        try:
            answer = await wait_loaded(self.rt.lifecycle_socket, model.name, timeout, disconnect)
        except ManagerUnavailable as e:
            log.warning("model %s is not loaded and the model manager does not answer: %s", model.name, e)
            raise ApiError(503, f"model {model.name!r} is not loaded and cannot be loaded now (the model manager is "
                           "not running); retry shortly", "model_not_ready", {"Retry-After": "5"}) from None
        finally:
            ex.load_wait_s = (ex.load_wait_s or 0.0) + time.perf_counter() - t0
        if answer.get("ok"):
            return
        if disconnect.cancelled():
            raise ApiError(503, "this server is shutting down and its grace period is over; retry (another host)",
                           "draining", {"Retry-After": "1"})
        headers = {"Retry-After": str(answer["retry_after"])} if answer.get("retry_after") else {}
        raise ApiError(int(answer.get("status", 503)), str(answer.get("message", "")),
                       str(answer.get("code", "model_not_ready")), headers)

    def _done(self, model: ModelConfig, ex: Exchange, disconnect: asyncio.Future[None]) -> None:
        self.rt.watches.discard(disconnect)
        self.rt.leave(model, ex)
        finish(self.rt.events, ex)
        self.rt.settle(ex)

    async def _send(self, model: ModelConfig, method: str, body: bytes, headers: dict[str, str],
                    disconnect: asyncio.Future[None], request_id: str) -> UpstreamResponse:
        """Send the request and wait for the response headers, unless the client leaves, the worker's grace period
        ends (``disconnect`` done either way) or request_timeout_s passes.

        The wait runs in the request's own task: the watch's callback or the deadline timer cancels it. A second task
        and an ``asyncio.wait`` race per request would cost more than the rest of the forwarding."""
        timeout = self.rt.cfg.server.request_timeout_s
        url = f"http://127.0.0.1:{model.port}{self.route.path}"
        task = asyncio.current_task()
        assert task is not None
        deadlines = self.rt.deadlines

        def interrupt(_: asyncio.Future[None]) -> None:
            # Scheduled when the watch completes, so it may run after the wait is over: then the task is no longer
            # in ``deadlines`` and nothing happens.
            if deadlines.discard(task):
                task.cancel()

        deadlines.add(task, timeout)
        disconnect.add_done_callback(interrupt)
        try:
            return await self.rt.upstream.send(method, url, body, headers)
        except asyncio.CancelledError:
            if deadlines.discard(task):
                raise  # cancelled for another reason: the worker is shutting down
            task.uncancel()
            if disconnect.cancelled():
                raise ApiError(503, "this server is shutting down and its grace period is over; retry (another host)",
                               "draining", {"Retry-After": "1"}) from None
            if disconnect.done():
                raise ApiError(499, "client closed the request", "client_closed") from None
            metrics.UPSTREAM_ERRORS.labels(model.name, "timeout").inc()
            raise ApiError(504, f"model {model.name!r} sent no response headers within {timeout:g} s "
                           "(server.request_timeout_s)", "upstream_timeout") from None
        except UpstreamError as e:
            metrics.UPSTREAM_ERRORS.labels(model.name, e.kind).inc()
            if e.kind == "refused":
                self.rt.readiness.mark_refused(model)
            log.warning("request %s: model %s unreachable: %s", request_id, model.name, e)
            raise ApiError(502, f"model {model.name!r} {_FAILURES.get(e.kind, 'failed')}", "upstream_unreachable"
                           ) from None
        finally:
            deadlines.discard(task)
            disconnect.remove_done_callback(interrupt)


class Props(Forward):
    """GET /props, read-only: the chosen model's settings (context size, chat template...), which clients read.

    ``?model=NAME`` chooses the model, as in llama-server's router mode; without it, the default chat model. POST
    /props, which changes a model's settings for every client, is refused (405, as any method a path does not serve).
    """

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if self.rt.draining:
            raise ApiError(503, "this server is shutting down; retry (another host)", "draining", {"Retry-After": "1"})
        name = req.get_param("model")
        client = req.context.exchange.client
        await self._forward(req, resp, self._model({"model": name} if name else {}, client), "GET", b"")

    on_head = on_get

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        raise ApiError(405, "POST /props is not served by this appliance: it changes a model's settings for every "
                       "client (GET /props reads them)", "method_not_allowed", {"Allow": "GET, HEAD"})
