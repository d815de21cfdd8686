"""Layers: where a Python proxy's added latency at one connection goes, one layer of the stack at a time.

Usage: python -m bench.layers [--seconds 4] [--rounds 3]

The same forwarding of the small chat completion to the nginx stub (as in bench.proxy_overhead), built up one layer
at a time, each in a single process on uvloop, measured with wrk at one connection (where latency is the sum of every
step on the path, nothing overlaps):

  direct     wrk -> stub
  protocol   asyncio protocols and httptools only: the request goes upstream from the callback that parsed it, the
             answer back from the upstream connection's callback (the floor of Python on uvloop)
  task       the same, but each request runs in a task that awaits a future for the answer (how every async
             framework runs a request)
  client     the task layer with the appliance's upstream client (appliance.proxy.upstream) instead of the pipelined
             connection
  uvicorn    uvicorn (httptools, uvloop) with a plain ASGI app forwarding through the appliance's upstream client
  falcon     the same with a Falcon app and resource in between
  appliance  the appliance proxy as supervisord runs it (gunicorn, 2 uvicorn workers, API keys, metrics, events,
             readiness, disconnect watch)

Reported: requests/s and p50 per path (medians over --rounds interleaved rounds), the p50 each adds over direct and
over the layer before it. The appliance's goal (at most 0.15 ms added at one connection) is shown against the layers
it cannot do without.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from typing import Any, cast

import falcon.asgi
import httptools
import uvicorn
import uvloop

from appliance.proxy.upstream import Upstream
from bench.common import (
    AUTH_HEADERS,
    CHAT_PATH,
    CHAT_REQUEST,
    LOOPBACK,
    PYTHON,
    Children,
    appliance_config,
    base_parser,
    check_same_answer,
    fmt,
    free_port,
    machine_summary,
    measured_wrk,
    median,
    run_main,
    say,
    start_appliance_proxy,
    start_stub_nginx,
    stub_model,
    table,
    temp_dir,
    wrk_script,
)

LAYERS = ("protocol", "task", "client", "uvicorn", "falcon")
GOAL_ADDED_P50_MS = 0.15


def _request(body: bytes) -> bytes:
    return (b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: stub\r\ncontent-type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _response(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


class _Parsed(asyncio.Protocol):
    """A connection whose bytes go to an httptools parser; the body is collected until the message is complete."""

    transport: asyncio.Transport
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    def __init__(self) -> None:
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def take_body(self) -> bytes:
        body, self.body = b"".join(self.body), []
        return body


class _Upstream(_Parsed):
    """One kept-alive connection to the stub; requests are pipelined, answers handed out in order."""

    def __init__(self) -> None:
        super().__init__()
        self.parser = httptools.HttpResponseParser(self)
        self.waiting: collections.deque[Any] = collections.deque()  # callbacks, or futures (the task layer)

    def on_message_complete(self) -> None:
        body = self.take_body()
        waiter = self.waiting.popleft()
        if isinstance(waiter, asyncio.Future):
            waiter.set_result(body)
        else:
            waiter(body)


class _Front(_Parsed):
    """The client side of the protocol, task and client layers."""

    def __init__(self, upstream: _Upstream, upstream_url: str, layer: str) -> None:
        super().__init__()
        self.parser = httptools.HttpRequestParser(self)
        self.upstream = upstream
        self.upstream_url = upstream_url
        self.layer = layer

    def on_message_complete(self) -> None:
        body = self.take_body()
        if self.layer == "task":
            asyncio.get_running_loop().create_task(self.handle(body))
        elif self.layer == "client":
            asyncio.get_running_loop().create_task(self.handle_with_client(body))
        else:
            self.upstream.waiting.append(self.answer)
            self.upstream.transport.write(_request(body))

    def answer(self, body: bytes) -> None:
        if not self.transport.is_closing():  # the client may have left meanwhile
            self.transport.write(_response(body))

    async def handle(self, body: bytes) -> None:
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.upstream.waiting.append(answer)
        self.upstream.transport.write(_request(body))
        self.answer(await answer)

    async def handle_with_client(self, body: bytes) -> None:
        self.answer(await _forward(self.upstream_url, body))


_client: Upstream | None = None


async def _forward(url: str, body: bytes) -> bytes:
    """POST ``body`` through the appliance's upstream client: one per layer's process, started on first use."""
    global _client
    if _client is None:
        _client = Upstream()
        await _client.start()
    answer = await _client.send("POST", url, body, {"content-type": "application/json"})
    return await answer.read()


async def _serve_protocols(port: int, upstream_port: int, layer: str) -> None:
    loop = asyncio.get_running_loop()
    _, upstream = await loop.create_connection(_Upstream, LOOPBACK, upstream_port)
    url = f"http://{LOOPBACK}:{upstream_port}{CHAT_PATH}"
    server = await loop.create_server(lambda: _Front(upstream, url, layer), LOOPBACK, port)
    await server.serve_forever()


def _asgi_app(upstream_url: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await _forward(upstream_url, (await receive())["body"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def _falcon_app(upstream_url: str) -> Any:
    class Forward:
        async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
            resp.data = await _forward(upstream_url, await req.stream.read())
            resp.content_type = "application/json"

    app = falcon.asgi.App()
    app.add_route(CHAT_PATH, Forward())
    return app


def serve(layer: str, port: int, upstream_port: int) -> None:
    if layer in ("protocol", "task", "client"):
        uvloop.run(_serve_protocols(port, upstream_port, layer))
        return
    url = f"http://{LOOPBACK}:{upstream_port}{CHAT_PATH}"
    app = _asgi_app(url) if layer == "uvicorn" else _falcon_app(url)
    uvicorn.run(app, host=LOOPBACK, port=port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning", lifespan="off")


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":  # a layer's own process
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser: argparse.ArgumentParser = base_parser(__doc__)
    parser.add_argument("--seconds", type=int, default=4, help="wrk duration of each measured run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    args = parser.parse_args()
    tmp = temp_dir("layers")
    say(f"work directory {tmp}")
    with Children() as kids:
        stub_port, _ = start_stub_nginx(kids, tmp / "stub")
        ports = {"direct": stub_port}
        for layer in LAYERS:
            ports[layer] = free_port()
            kids.start(layer, [PYTHON, "-m", "bench.layers", "--serve", layer, str(ports[layer]), str(stub_port)],
                       tmp / f"{layer}.log")
        config, ports["appliance"] = appliance_config(tmp, [stub_model(stub_port)])
        start_appliance_proxy(kids, tmp, config, ports["appliance"])
        urls = {path: f"http://{LOOPBACK}:{port}{CHAT_PATH}" for path, port in ports.items()}
        check_same_answer(kids, urls, urls["direct"])
        script = wrk_script(tmp, CHAT_REQUEST, AUTH_HEADERS)
        print(machine_summary())
        print(f"wrk -t1 -c1, {args.seconds} s per run after 1 s of warm-up, {args.rounds} round(s)")
        print()
        runs: dict[str, list[tuple[float, float]]] = {path: [] for path in urls}
        for r in range(args.rounds):
            for path, url in urls.items():
                w, _ = measured_wrk(url, script, 1, args.seconds)
                if w.errors:
                    raise RuntimeError(f"{path}: {w.errors} requests failed")
                runs[path].append((w.rps, w.p50_ms))
                say(f"round {r + 1}/{args.rounds} {path}: {w.rps:,.0f} req/s, p50 {w.p50_ms:.3f} ms")
                kids.check_alive()
        p50 = {path: median(x[1] for x in got) for path, got in runs.items()}
        rows = []
        previous = None
        for path, got in runs.items():
            rows.append([path, fmt(median(x[0] for x in got), ",.0f"), fmt(p50[path], ".3f"),
                         fmt(p50[path] - p50["direct"], "+.3f") if path != "direct" else "-",
                         fmt(p50[path] - p50[previous], "+.3f") if previous else "-"])
            previous = path
        print(table(["path", "req/s", "p50 ms", "p50 +ms vs direct", "p50 +ms vs the layer before"], rows))
        print()
        floor = p50["falcon"] - p50["direct"]
        added = p50["appliance"] - p50["direct"]
        print(f"goal: the appliance adds <= {GOAL_ADDED_P50_MS} ms at c=1: {added:+.3f} ms; uvicorn + Falcon + the "
              f"upstream client alone add {floor:+.3f} ms, the appliance's features on top {added - floor:+.3f} ms")
        print(machine_summary(load_only=True))
    say(f"stopped everything; logs were in {tmp}")
    return 0


if __name__ == "__main__":
    run_main(main)
