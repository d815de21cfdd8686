"""A small real HTTP server that behaves like llama-server where the tests need control over it.

It runs aiohttp in a background thread. What it does with a request is chosen by a ``"stub"`` field in the JSON
body (the proxy forwards unknown fields verbatim, which is itself under test):

- absent: answer ``FIXED_RESPONSE`` bytes as JSON;
- ``"stream"``: ``n`` SSE events ``delay`` seconds apart, then ``data: [DONE]``;
- ``"stall"``: wait ``delay`` seconds before sending headers;
- ``"die"``: stream two events, then drop the connection without finishing the chunked body;
- ``"reset"``: drop the connection without answering;
- ``"forever"``: one event every 0.05 s for up to 60 s (to watch the proxy close the upstream);
- ``"doom"``: answer normally, but drop the next request that arrives on the same connection unanswered, as a server
  closing an idle kept-alive connection just as a request arrives.

Every request is recorded (path, headers, raw body) and so is the moment each one's connection closed early.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

FIXED_RESPONSE = (b'{"id":"stub-1",  "object":"chat.completion","created":1,"model":"stub","choices":[{"index":0,'
                  b'"finish_reason":"stop","message":{"role":"assistant","content":"h\\u00e9llo"}}],'
                  b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}')
# The shape of llama-server's --metrics output (names with a colon, counters with _total).
STUB_METRICS = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 12
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""
EMBEDDING_RESPONSE = (b'{"object":"list","model":"stub","data":[{"object":"embedding","index":0,'
                      b'"embedding":[0.25,-0.5,1.0]}],"usage":{"prompt_tokens":1,"total_tokens":1}}')


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    closed_early_at: float | None = None
    events_sent: int = 0


@dataclass
class StubLlama:
    port: int
    health_status: int = 200
    received: list[Received] = field(default_factory=list)
    doomed: set[object] = field(default_factory=set)
    dropped: int = 0  # requests dropped unanswered because their connection was doomed
    health_checks: list[dict[str, str]] = field(default_factory=list)  # the headers of each GET /health
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            app = web.Application(client_max_size=1024**3)
            app.router.add_get("/health", self._health)
            app.router.add_get("/metrics", self._metrics)
            app.router.add_get("/props", self._props)
            app.router.add_post("/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            self._loop.run_until_complete(site.start())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("stub llama-server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None  # stopping twice is a no-op

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks.append(dict(request.headers))
        if self.health_status == 503:
            return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)
        return web.json_response({"status": "ok"}, status=self.health_status)

    async def _props(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), b""))
        return web.json_response({"default_generation_settings": {"n_ctx": 4096}, "stub_port": self.port})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=STUB_METRICS, content_type="text/plain")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Received(request.path, dict(request.headers), body)
        self.received.append(rec)
        try:
            doc: dict[str, Any] = json.loads(body)
        except ValueError:
            doc = {}
        mode = doc.get("stub")
        try:
            if mode == "doom":
                self.doomed.add(request.transport)
            elif request.transport in self.doomed:
                self.dropped += 1
                mode = "reset"
            if mode == "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            if request.path == "/v1/embeddings":
                return web.Response(body=EMBEDDING_RESPONSE, headers={"Content-Type": "application/json"})
            if mode == "stall":
                await asyncio.sleep(float(doc.get("delay", 30)))
            if mode in ("stream", "die", "forever"):
                return await self._stream(request, rec, mode, int(doc.get("n", 5)), float(doc.get("delay", 0.05)))
            return web.Response(body=FIXED_RESPONSE, headers={"Content-Type": "application/json; charset=utf-8"})
        except (asyncio.CancelledError, ConnectionResetError):
            rec.closed_early_at = time.monotonic()
            raise

    async def _stream(self, request: web.Request, rec: Received, mode: str, n: int, delay: float
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        count = 1200 if mode == "forever" else n
        for i in range(count):
            event = {"id": "stub-s", "object": "chat.completion.chunk", "created": 1, "model": "stub",
                     "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            rec.events_sent += 1
            if mode == "die" and i == 1:
                assert request.transport is not None
                request.transport.abort()
                return resp
            await asyncio.sleep(delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
