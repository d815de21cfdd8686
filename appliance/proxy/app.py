"""The Falcon ASGI reverse proxy: OpenAI API in front of the llama-server children (SPEC §2)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import falcon
import falcon.asgi

from appliance.config import ApplianceConfig, ModelConfig, load, read_api_keys
from appliance.events.sink import EventSink
from appliance.metrics import proxy as metrics
from appliance.proxy.errors import (
    ApiError,
    handle_api_error,
    handle_http_error,
    handle_unexpected,
    sse_error_event,
)
from appliance.proxy.readiness import Readiness
from appliance.proxy.upstream import Upstream, UpstreamError, UpstreamResponse

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

CONFIG_ENV = "APPLIANCE_CONFIG"
OPEN_PATHS = frozenset({"/health", "/livez"})  # no key needed; probes, so no event either
# Request headers that reach llama-server; everything else (Authorization first of all) stays here.
UPSTREAM_HEADERS = ("content-type", "accept")
# Response headers passed back to the client besides the body.
DOWNSTREAM_HEADERS = ("content-type", "content-length", "content-encoding", "cache-control")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_RECEIVE_KEY = "appliance.receive"


class Runtime:
    """Per-worker state shared by the resources, the lifespan hooks and the draining worker."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.upstream = Upstream()
        self.readiness = Readiness(cfg, self.upstream)
        self.events = EventSink(cfg.events, cfg.events_file)
        self.keys: tuple[bytes, ...] = ()
        if cfg.server.api_keys_file:
            self.keys = tuple(k.encode() for k in read_api_keys(Path(cfg.server.api_keys_file)))
        self.in_flight = 0
        self.draining = False
        #: The worker is on its way out (draining or retiring): every response closes its connection.
        self.closing = False
        self.started = int(time.time())
        self.names: dict[str, ModelConfig] = {}
        for m in cfg.models:
            for n in (m.name, *m.aliases):
                self.names[n] = m

    def enter(self, model: str) -> None:
        self.in_flight += 1
        metrics.IN_FLIGHT.labels(model).inc()

    def leave(self, model: str) -> None:
        self.in_flight -= 1
        metrics.IN_FLIGHT.labels(model).dec()

    def default_model(self, kind: str) -> ModelConfig | None:
        return next((m for m in self.cfg.models if m.kind == kind), None)

    def key_ok(self, presented: bytes) -> bool:
        # Compare against every key so the time taken does not reveal which key (or how much of it) matched.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(presented, key)
        return ok


USAGE_BODY_LIMIT = 1 << 20
# Complete bodies up to this size (known Content-Length, not SSE) are sent in one piece: llama-server writes them at
# once, and one send instead of a chunk relay halves the proxy's per-request cost on small (embedding) responses.
INLINE_BODY_MAX = 256 * 1024
STREAM_TAIL = 8192


@dataclass
class Exchange:
    """What one request did, for its metrics and its event. Never holds prompt or completion text past the request."""

    request_id: str
    t0: float
    route: str = "other"
    model: str = ""
    status: int = 0
    headers_s: float = 0.0
    stream: bool = False
    relayed: bool = False
    bytes_out: int = 0
    events: int = 0
    first_event_s: float | None = None
    kept: bytes = b""  # the JSON body (bounded) or the stream's tail, only to read "usage" at the end

    def keep(self, chunk: bytes) -> None:
        if self.stream:
            self.kept = (self.kept + chunk)[-STREAM_TAIL:]
        elif len(self.kept) < USAGE_BODY_LIMIT:
            self.kept += chunk

    def usage(self) -> dict[str, Any] | None:
        """The last ``"usage": {...}`` object in what was kept, decoded alone (not the whole body).

        Inside JSON strings quotes are escaped, so the unescaped key cannot come from generated text."""
        at = self.kept.rfind(b'"usage":')
        if at < 0:
            return None
        try:
            usage, _ = json.JSONDecoder().raw_decode(self.kept[at + 8:].decode(errors="replace").lstrip())
        except ValueError:
            return None
        if not isinstance(usage, dict):
            return None
        return {k: v for k, v in usage.items() if k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def finish(rt: Runtime, ex: Exchange) -> None:
    """Record the metrics that need the whole response, and emit the request's event."""
    total = time.perf_counter() - ex.t0
    metrics.DURATION_SECONDS.labels(ex.route, ex.model).observe(total)
    metrics.RESPONSE_BYTES.labels(ex.route, ex.model).inc(ex.bytes_out)
    if ex.stream:
        metrics.STREAM_EVENTS.labels(ex.model).observe(ex.events)
        if ex.first_event_s is not None:
            metrics.FIRST_TOKEN_SECONDS.labels(ex.model).observe(ex.first_event_s)
    event: dict[str, Any] = {
        "ts": round(time.time(), 3), "event": "request", "request_id": ex.request_id, "route": ex.route,
        "model": ex.model or None, "status": ex.status, "stream": ex.stream,
        "headers_ms": round(ex.headers_s * 1000, 3), "total_ms": round(total * 1000, 3),
    }
    if ex.first_event_s is not None:
        event["first_token_ms"] = round(ex.first_event_s * 1000, 3)
    usage = ex.usage() if ex.kept else None
    if usage:
        event["usage"] = usage
    if ex.route not in OPEN_PATHS:
        rt.events.emit(event)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _relay(rt: Runtime, up: UpstreamResponse, disconnect: asyncio.Future[None], ex: Exchange
                 ) -> AsyncIterator[bytes]:
    """Pass chunks through as they arrive, racing every read against the client's disconnect.

    uvicorn turns send() into a no-op once the client has gone, and Falcon keeps iterating the stream; without this
    race llama-server would keep generating for nobody. The upstream is closed here, in the task that reads it.
    """
    chunks = up.chunks().__aiter__()
    try:
        while True:
            nxt = asyncio.ensure_future(chunks.__anext__())
            await asyncio.wait((nxt, disconnect), return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                up.close()
                return
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                up.release()
                return
            except UpstreamError as e:
                up.close()
                metrics.UPSTREAM_ERRORS.labels(ex.model, "mid-stream").inc()
                if ex.stream:
                    yield sse_error_event(f"llama-server failed mid-stream: {e}", "upstream_error")
                    return
                raise
            if ex.stream:
                if ex.first_event_s is None:
                    ex.first_event_s = time.perf_counter() - ex.t0
                ex.events += chunk.count(b"data: ")
            ex.bytes_out += len(chunk)
            ex.keep(chunk)
            yield chunk
    finally:
        disconnect.cancel()
        rt.leave(ex.model)
        finish(rt, ex)


class Forward:
    """POST routes forwarded byte-for-byte to the model the body names."""

    def __init__(self, rt: Runtime, path: str, kind: str) -> None:
        self.rt = rt
        self.path = path
        self.kind = kind

    async def _read_body(self, req: falcon.asgi.Request) -> bytes:
        limit = self.rt.cfg.server.body_limit_bytes
        too_large = ApiError(413, f"request body is larger than the limit of {limit} bytes", "request_too_large")
        if req.content_length is not None and req.content_length > limit:
            raise too_large
        parts: list[bytes] = []
        size = 0
        async for chunk in req.stream:
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
        return b"".join(parts)

    def _route(self, body: bytes) -> ModelConfig:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from e
        if not isinstance(doc, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_json")
        name = doc.get("model")
        if name is None or name == "":
            model = self.rt.default_model(self.kind)
            if model is None:
                raise ApiError(404, f"no {self.kind} model is configured; name one in \"model\"", "model_not_found")
            return model
        if not isinstance(name, str):
            raise ApiError(400, "\"model\" must be a string", "invalid_model")
        model = self.rt.names.get(name)
        if model is None:
            known = ", ".join(sorted(self.rt.names))
            raise ApiError(404, f"model {name!r} does not exist; available: {known}", "model_not_found")
        if model.kind != self.kind:
            raise ApiError(400, f"model {name!r} is a {model.kind} model and cannot serve {self.path}",
                           "wrong_model_kind")
        return model

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rt = self.rt
        if rt.draining:
            raise ApiError(503, "this server is shutting down; retry (another host)", "draining", {"Retry-After": "1"})
        body = await self._read_body(req)
        model = self._route(body)
        ex: Exchange = req.context.exchange
        ex.model = model.name
        metrics.REQUEST_BYTES.labels(ex.route, model.name).inc(len(body))
        if not rt.readiness.is_ready(model):
            state = rt.readiness.models[model.name].state
            raise ApiError(503, f"model {model.name!r} is not ready ({state}); retry shortly", "model_not_ready",
                           {"Retry-After": "2"})
        headers = {h: v for h in UPSTREAM_HEADERS if (v := req.get_header(h))}
        headers["x-request-id"] = req.context.request_id
        disconnect = asyncio.ensure_future(_wait_disconnect(req.scope[_RECEIVE_KEY]))
        rt.enter(model.name)
        handed_over = False
        try:
            up = await self._send(model, body, headers, disconnect)
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
                    raise ApiError(502, f"model {model.name!r} broke the connection: {e}", "upstream_error") from e
                ex.keep(data)
                resp.data = data
            else:
                ex.relayed = True
                resp.stream = _relay(rt, up, disconnect, ex)
                handed_over = True
        finally:
            if not handed_over:
                disconnect.cancel()
                rt.leave(model.name)

    async def _send(self, model: ModelConfig, body: bytes, headers: dict[str, str], disconnect: asyncio.Future[None]
                    ) -> UpstreamResponse:
        timeout = self.rt.cfg.server.request_timeout_s
        url = f"http://127.0.0.1:{model.port}{self.path}"
        sending = asyncio.ensure_future(self.rt.upstream.send("POST", url, body, headers))
        await asyncio.wait((sending, disconnect), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not sending.done():
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                await sending
            if disconnect.done():
                raise ApiError(499, "client closed the request", "client_closed")
            metrics.UPSTREAM_ERRORS.labels(model.name, "timeout").inc()
            raise ApiError(504, f"model {model.name!r} sent no response headers within {timeout:g} s "
                           "(server.request_timeout_s)", "upstream_timeout")
        try:
            return sending.result()
        except UpstreamError as e:
            metrics.UPSTREAM_ERRORS.labels(model.name, e.kind).inc()
            if e.kind == "refused":
                self.rt.readiness.mark_refused(model)
            raise ApiError(502, f"model {model.name!r} is unreachable: {e}", "upstream_unreachable") from e


class Models:
    def __init__(self, rt: Runtime) -> None:
        self.body = json.dumps({
            "object": "list",
            "data": [{"id": m.name, "object": "model", "created": rt.started, "owned_by": "appliance",
                      "kind": m.kind, "aliases": list(m.aliases)} for m in rt.cfg.models],
        }).encode()

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.body


class Health:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.version = version("appliance")

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rt = self.rt
        status, warm = rt.readiness.summary()
        if rt.draining:
            status = "draining"
        default = rt.default_model("chat") or rt.cfg.models[0]
        doc = {
            "status": status,
            "warm_up_state": warm,
            "backend": "llama-server",
            "model": default.name,
            "models": {n: {"state": s.state, "since": round(s.since, 3), "restarts": s.restarts}
                       for n, s in rt.readiness.models.items()},
            "version": self.version,
        }
        resp.status = 200 if status == "ok" else 503
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps(doc).encode()


class Livez:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"status":"ok"}'


class Middleware:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def process_startup(self, scope: Scope, event: Any) -> None:
        await self.rt.upstream.start()
        await self.rt.events.start()
        await self.rt.readiness.start()

    async def process_shutdown(self, scope: Scope, event: Any) -> None:
        await self.rt.readiness.stop()
        await self.rt.events.stop()
        await self.rt.upstream.close()

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        incoming = req.get_header("x-request-id")
        req.context.request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        req.context.exchange = Exchange(req.context.request_id, time.perf_counter())
        if self.rt.keys and req.path not in OPEN_PATHS:
            auth = req.get_header("authorization") or ""
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token or not self.rt.key_ok(token.strip().encode()):
                raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               params: dict[str, Any]) -> None:
        req.context.exchange.route = req.uri_template

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               req_succeeded: bool) -> None:
        resp.set_header("X-Request-Id", req.context.request_id)
        if self.rt.closing:
            resp.set_header("Connection", "close")
        ex: Exchange = req.context.exchange
        ex.status = int(resp.status_code)
        ex.headers_s = time.perf_counter() - ex.t0
        metrics.REQUESTS.labels(ex.route, ex.model, str(ex.status)).inc()
        metrics.HEADERS_SECONDS.labels(ex.route, ex.model).observe(ex.headers_s)
        if not ex.relayed:
            ex.bytes_out = len(resp.data or b"")
            finish(self.rt, ex)


class ProxyApp:
    """The ASGI callable: Falcon, plus access to ``receive`` for disconnect detection in streaming responders."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        self.runtime = Runtime(cfg)
        rt = self.runtime
        app = falcon.asgi.App(middleware=[Middleware(rt)], cors_enable=False)
        app.req_options.auto_parse_form_urlencoded = False
        app.add_route("/v1/chat/completions", Forward(rt, "/v1/chat/completions", "chat"))
        app.add_route("/v1/completions", Forward(rt, "/v1/completions", "chat"))
        app.add_route("/v1/embeddings", Forward(rt, "/v1/embeddings", "embed"))
        app.add_route("/v1/models", Models(rt))
        app.add_route("/health", Health(rt))
        app.add_route("/livez", Livez())
        app.add_error_handler(Exception, handle_unexpected)
        app.add_error_handler(falcon.HTTPError, handle_http_error)
        app.add_error_handler(ApiError, handle_api_error)
        self.falcon = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RECEIVE_KEY] = receive
        await self.falcon(scope, receive, send)  # type: ignore[arg-type]


def from_env() -> ProxyApp:
    """Factory for gunicorn (``appliance.proxy.app:from_env()``): the config path comes from $APPLIANCE_CONFIG."""
    return ProxyApp(load(os.environ[CONFIG_ENV], check_files=False))
