"""Passing a response body back chunk by chunk while watching for the client to leave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from appliance.metrics import proxy as metrics
from appliance.proxy.errors import sse_error_event
from appliance.proxy.exchange import Exchange
from appliance.proxy.upstream import UpstreamError, UpstreamResponse

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def relay(up: UpstreamResponse, disconnect: asyncio.Future[None], ex: Exchange,
                done: Callable[[], None]) -> AsyncIterator[bytes]:
    """Pass chunks through as they arrive, racing every read against the client's disconnect (or a cut: the watch
    cancelled by ``Runtime.cut``).

    uvicorn turns send() into a no-op once the client has gone, and Falcon keeps iterating the stream; without this
    race llama-server would keep generating for nobody. The upstream is closed here, in the task that reads it.
    ``done`` runs once the body has ended, however it ended.
    """
    chunks = up.chunks().__aiter__()
    try:
        while True:
            nxt = asyncio.ensure_future(chunks.__anext__())
            await asyncio.wait((nxt, disconnect), return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                up.close()
                if disconnect.cancelled() and ex.stream:  # cut by the worker's shutdown, the client is still there
                    yield sse_error_event("the server is shutting down and its grace period is over; the answer is "
                                          "incomplete", "draining")
                return
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                up.release()
                return
            except UpstreamError:
                up.close()
                metrics.UPSTREAM_ERRORS.labels(ex.model, "mid-stream").inc()
                if ex.stream:
                    yield sse_error_event(f"model {ex.model!r} failed mid-stream; the answer is incomplete",
                                          "upstream_error")
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
        done()
