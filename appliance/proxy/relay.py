"""Passing a response body back chunk by chunk while watching for the client to leave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from appliance.metrics import proxy as metrics
from appliance.proxy.errors import sse_error_event
from appliance.proxy.exchange import Exchange
from appliance.proxy.routes import is_anthropic
from appliance.proxy.upstream import Broken, UpstreamError, UpstreamResponse


async def relay(up: UpstreamResponse, disconnect: asyncio.Future[None], ex: Exchange,
                done: Callable[[], None]) -> AsyncIterator[bytes]:
    """Pass chunks through as they arrive until the body ends, the upstream fails or the client leaves.

    uvicorn turns send() into a no-op once the client has gone, and Falcon keeps iterating the stream; without a watch
    llama-server would keep generating for nobody. ``disconnect`` (the connection's watch, or cancelled by
    ``Runtime.cut`` at the end of a drain) closes the upstream response the moment it is done, which ends the read
    below at once: one callback per request instead of a race per chunk. ``done`` runs once the body has ended,
    however it ended.
    """
    def close(_: asyncio.Future[None]) -> None:
        up.close()

    disconnect.add_done_callback(close)
    try:
        async for chunk in up.chunks():
            if ex.stream:
                if ex.first_event_s is None:
                    ex.first_event_s = time.perf_counter() - ex.t0
                ex.events += chunk.count(b"data: ")
            ex.bytes_out += len(chunk)
            ex.keep(chunk)
            yield chunk
        up.release()
    except Broken as e:
        if disconnect.done():
            if disconnect.cancelled() and ex.stream:  # cut by the worker's shutdown, the client is still there
                yield sse_error_event("the server is shutting down and its grace period is over; the answer is "
                                      "incomplete", "draining", is_anthropic(ex.route))
            return
        up.close()
        metrics.UPSTREAM_ERRORS.labels(ex.model, "mid-stream").inc()
        if ex.stream:
            yield sse_error_event(f"model {ex.model!r} failed mid-stream; the answer is incomplete", "upstream_error",
                                  is_anthropic(ex.route))
            return
        raise UpstreamError("reset", f"connection to llama-server broke: {e}") from e
    finally:
        disconnect.remove_done_callback(close)
        up.close()  # a no-op once released; drops the connection of a body left unfinished (the generator closed)
        done()
