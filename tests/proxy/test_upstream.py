"""The upstream client against a real HTTP server, without a proxy around it (so nothing else shares its pool)."""

from __future__ import annotations

import asyncio

import pytest

from appliance.proxy.upstream import Upstream, UpstreamError
from tests.helpers import free_port
from tests.stub_llama import FIXED_RESPONSE, StubLlama


async def _call(upstream: Upstream, url: str, body: bytes) -> tuple[int, bytes]:
    r = await upstream.send("POST", url, body, {"Content-Type": "application/json"})
    data = await r.read()
    r.release()
    return r.status, data


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
