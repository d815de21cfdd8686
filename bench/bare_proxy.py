"""The floor of this stack: a bare Falcon ASGI reverse proxy with a pooled upstream client, nothing else.

No API keys, metrics, events, readiness, queue bound or disconnect race: what is left is the cost of gunicorn,
uvicorn (uvloop, httptools), Falcon and the client library, with the tuning the appliance uses that is not a feature
(no X-Forwarded-For layer, no cookie jar, a frozen heap), so that the comparison prices the features alone.
bench/common.py serves it with the appliance's settings:

    BARE_PROXY_UPSTREAM=http://127.0.0.1:PORT python -m gunicorn --workers 2 \\
        --worker-class bench.bare_proxy.BareWorker bench.bare_proxy:app

Every request goes to the same path on $BARE_PROXY_UPSTREAM. $BARE_PROXY_CLIENT picks the upstream client: aiohttp
(the appliance's, the default), httpx or httpx-aiohttp (httpx on aiohttp's transport), to compare them inside a proxy.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import aiohttp
import falcon
import falcon.asgi
from uvicorn_worker import UvicornWorker

UPSTREAM = os.environ.get("BARE_PROXY_UPSTREAM", "http://127.0.0.1:8081")
CLIENT = os.environ.get("BARE_PROXY_CLIENT", "aiohttp")


class AiohttpForwarder:
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                             cookie_jar=aiohttp.DummyCookieJar(),
                                             skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, body: bytes,
                      headers: dict[str, str]) -> None:
        assert self.session is not None
        up = await self.session.request(req.method, UPSTREAM + req.path, data=body, headers=headers)
        resp.status = up.status
        resp.content_type = up.headers.get("content-type")
        if "content-length" in up.headers:
            resp.data = await up.read()
        else:
            resp.stream = self._relay(up)

    @staticmethod
    async def _relay(up: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in up.content.iter_any():
                yield chunk
        finally:
            up.release()


class HttpxForwarder:
    def __init__(self, on_aiohttp: bool) -> None:
        self.on_aiohttp = on_aiohttp
        self.client: Any = None  # httpx.AsyncClient: httpx is imported only when it is used

    async def start(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
        if self.on_aiohttp:
            from httpx_aiohttp import HttpxAiohttpClient

            self.client = HttpxAiohttpClient(limits=limits, timeout=None)
        else:
            self.client = httpx.AsyncClient(limits=limits, timeout=None)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def forward(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, body: bytes,
                      headers: dict[str, str]) -> None:
        request = self.client.build_request(req.method, UPSTREAM + req.path, content=body, headers=headers)
        up = await self.client.send(request, stream=True)
        resp.status = up.status_code
        resp.content_type = up.headers.get("content-type")
        if "content-length" in up.headers:
            resp.data = await up.aread()
        else:
            resp.stream = self._relay(up)

    @staticmethod
    async def _relay(up: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in up.aiter_raw():
                yield chunk
        finally:
            await up.aclose()


class BareProxy:
    def __init__(self, forwarder: AiohttpForwarder | HttpxForwarder) -> None:
        self.forwarder = forwarder

    async def process_startup(self, scope: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        await self.forwarder.start()  # in the worker's own event loop
        gc.freeze()  # as the appliance's workers do: tuning that is not a feature belongs to the floor too

    async def process_shutdown(self, scope: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        await self.forwarder.close()

    async def sink(self, req: falcon.asgi.Request, resp: falcon.asgi.Response | None, **params: Any) -> None:
        assert resp is not None  # None only for WebSocket requests, which this app does not accept
        body = await req.stream.read()
        headers = {"Content-Type": ct} if (ct := req.get_header("content-type")) else {}
        await self.forwarder.forward(req, resp, body, headers)


CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp")


def make_app() -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    if CLIENT not in CLIENTS:
        raise ValueError(f"BARE_PROXY_CLIENT must be one of {', '.join(CLIENTS)}, not {CLIENT!r}")
    forwarder = AiohttpForwarder() if CLIENT == "aiohttp" else HttpxForwarder(on_aiohttp=CLIENT == "httpx-aiohttp")
    proxy = BareProxy(forwarder)
    app = falcon.asgi.App(middleware=[proxy], cors_enable=False)
    app.add_sink(proxy.sink, prefix="/")
    return app


app = make_app()


class BareWorker(UvicornWorker):  # type: ignore[misc]
    """The appliance worker's uvicorn settings (appliance/proxy/worker.py), without its draining and HTTP limits."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "uvloop", "http": "httptools", "lifespan": "on",
                                               "proxy_headers": False}
