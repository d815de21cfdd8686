"""The upstream client against a real HTTP server, without a proxy around it (so nothing else shares its pool)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from appliance.proxy import upstream as upstream_module
from appliance.proxy.upstream import Broken, Upstream, UpstreamError
from tests.helpers import free_port
from tests.stub_llama import FIXED_RESPONSE, StubLlama

T = TypeVar("T")


async def _call(upstream: Upstream, url: str, body: bytes) -> tuple[int, bytes]:
    r = await upstream.send("POST", url, body, {"Content-Type": "application/json"})
    return r.status, await r.read()  # which puts the connection back into the pool


def test_a_pooled_connection_the_server_dropped_is_retried_once_on_a_fresh_one(chat_stub: StubLlama) -> None:
    url = f"http://127.0.0.1:{chat_stub.port}/v1/completions"

    async def main() -> list[tuple[int, bytes]]:
        upstream = Upstream()
        await upstream.start()
        try:
            # The first answer leaves one pooled connection, which the stub drops unanswered on its next request.
            return [await _call(upstream, url, body) for body in (b'{"stub": "doom"}', b'{"n": 1}', b'{"n": 2}')]
        finally:
            await upstream.close()

    assert asyncio.run(main()) == [(200, FIXED_RESPONSE)] * 3
    assert chat_stub.dropped == 1
    assert [x.body for x in chat_stub.received] == [b'{"stub": "doom"}', b'{"n": 1}', b'{"n": 1}', b'{"n": 2}']


def test_a_server_that_is_not_listening_is_refused_at_once() -> None:
    async def main() -> None:
        upstream = Upstream()
        await upstream.start()
        try:
            await upstream.send("POST", f"http://127.0.0.1:{free_port()}/v1/completions", b"{}", {})
        finally:
            await upstream.close()

    with pytest.raises(UpstreamError) as e:
        asyncio.run(main())
    assert e.value.kind == "refused"


def _run(stub: StubLlama, steps: Callable[[Upstream, str], Awaitable[T]]) -> T:
    async def main() -> T:
        upstream = Upstream()
        await upstream.start()
        try:
            return await steps(upstream, f"http://127.0.0.1:{stub.port}")
        finally:
            await upstream.close()

    return asyncio.run(main())


def _pooled(upstream: Upstream) -> int:
    return sum(len(idle) for idle in upstream._idle.values())


def test_a_stream_arrives_in_order_and_its_connection_is_not_reused(chat_stub: StubLlama) -> None:
    async def steps(upstream: Upstream, base: str) -> tuple[bytes, int, int]:
        r = await upstream.send("POST", base + "/v1/completions", b'{"stub": "stream", "n": 20, "delay": 0.01}', {})
        body = b"".join([chunk async for chunk in r.chunks()])
        r.release()
        after_stream = _pooled(upstream)
        r = await upstream.send("POST", base + "/v1/completions", b"{}", {})
        await r.read()
        return body, after_stream, _pooled(upstream)

    body, after_stream, after_answer = _run(chat_stub, steps)
    assert body.count(b"data: ") == 21 and body.endswith(b"data: [DONE]\n\n")
    assert [int(e[e.index(b"tok") + 3:e.index(b" ", e.index(b"tok"))]) for e in body.split(b"\n\n")[:20]] == \
        list(range(20))
    assert after_stream == 0  # llama-server would close it: closed here first
    assert after_answer == 1  # a Content-Length answer, once read, leaves its connection pooled


def test_closing_a_response_ends_a_pending_read_at_once_and_the_server_sees_it(chat_stub: StubLlama) -> None:
    async def steps(upstream: Upstream, base: str) -> float:
        r = await upstream.send("POST", base + "/v1/completions", b'{"stub": "forever"}', {})
        reader = asyncio.ensure_future(anext(r.chunks()))
        await reader  # the first event
        reader = asyncio.ensure_future(anext(r.chunks()))
        await asyncio.sleep(0.01)
        r.close()
        t0 = time.monotonic()
        with pytest.raises(Broken):
            await reader
        return time.monotonic() - t0

    assert _run(chat_stub, steps) < 0.05
    deadline = time.monotonic() + 2
    while chat_stub.received[-1].closed_early_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chat_stub.received[-1].closed_early_at is not None
    assert chat_stub.received[-1].events_sent < 40


def test_a_connection_broken_mid_body_raises_broken(chat_stub: StubLlama) -> None:
    async def steps(upstream: Upstream, base: str) -> list[bytes]:
        r = await upstream.send("POST", base + "/v1/completions", b'{"stub": "die"}', {})
        got: list[bytes] = []
        with pytest.raises(Broken):
            async for chunk in r.chunks():
                got.append(chunk)
        r.close()
        return got

    assert b"".join(_run(chat_stub, steps)).count(b"data: ") == 2


def test_cancelling_the_wait_for_headers_closes_the_connection(chat_stub: StubLlama) -> None:
    async def steps(upstream: Upstream, base: str) -> int:
        task = asyncio.ensure_future(upstream.send("POST", base + "/v1/completions", b'{"stub": "stall", "delay": 5}',
                                                   {}))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return _pooled(upstream)

    assert _run(chat_stub, steps) == 0
    deadline = time.monotonic() + 2
    while chat_stub.received[-1].closed_early_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chat_stub.received[-1].closed_early_at is not None


def test_an_idle_connection_past_the_keepalive_is_not_reused(chat_stub: StubLlama,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "KEEPALIVE_S", 0.1)

    async def steps(upstream: Upstream, base: str) -> list[int]:
        statuses = [(await _call(upstream, base + "/v1/completions", b'{"stub": "doom"}'))[0]]
        await asyncio.sleep(0.2)
        # A doomed connection, had it been reused, would drop this request (and the client would send it again).
        statuses.append((await _call(upstream, base + "/v1/completions", b'{"n": 1}'))[0])
        return statuses

    assert _run(chat_stub, steps) == [200, 200]
    assert chat_stub.dropped == 0


def test_only_the_given_headers_are_sent_besides_host_and_length(chat_stub: StubLlama) -> None:
    async def steps(upstream: Upstream, base: str) -> int:
        return (await _call(upstream, base + "/v1/completions?x=1", b"{}"))[0]

    assert _run(chat_stub, steps) == 200
    got = chat_stub.received[-1]
    assert {k.lower(): v for k, v in got.headers.items()} == {
        "host": f"127.0.0.1:{chat_stub.port}", "content-length": "2", "content-type": "application/json"}
    assert got.body == b"{}"


def test_health_is_none_when_nothing_listens_and_the_status_otherwise(chat_stub: StubLlama) -> None:
    async def steps(upstream: Upstream, base: str) -> tuple[int | None, int | None]:
        return (await upstream.health(base, 2.0),
                await upstream.health(f"http://127.0.0.1:{free_port()}", 2.0))

    chat_stub.health_status = 503
    assert _run(chat_stub, steps) == (503, None)


def test_health_asks_on_a_connection_of_its_own_and_keeps_none(chat_stub: StubLlama) -> None:
    """llama-server's HTTP library checks each kept-alive connection every 10 ms: the readiness poll keeps none."""
    async def steps(upstream: Upstream, base: str) -> tuple[int | None, bool, int]:
        await _call(upstream, base + "/v1/completions", b"{}")  # leaves one pooled connection
        pooled = list(upstream._idle[("127.0.0.1", chat_stub.port)])
        status = await upstream.health(base, 2.0)
        await asyncio.sleep(0.1)  # the health connection's close completes
        return status, list(upstream._idle[("127.0.0.1", chat_stub.port)]) == pooled, len(upstream._open)

    assert _run(chat_stub, steps) == (200, True, 1)
    assert chat_stub.health_checks[-1].get("Connection") == "close"


def test_a_reader_that_falls_behind_stops_the_reading_and_loses_nothing() -> None:
    pieces = [bytes([i]) * 65536 for i in range(64)]  # 4 MiB, chunked

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> tuple[int, bytes]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream()
        await upstream.start()
        try:
            r = await upstream.send("GET", f"http://127.0.0.1:{port}/big", None, {})
            await asyncio.sleep(0.3)  # a slow client: nothing read meanwhile
            held = r._conn.buffered
            body = b"".join([chunk async for chunk in r.chunks()])
            r.release()
            return held, body
        finally:
            await upstream.close()
            server.close()

    held, body = asyncio.run(main())
    assert held <= 2 * upstream_module._HIGH_WATER, held  # the rest waits in the kernel and at the server
    assert body == b"".join(pieces)
