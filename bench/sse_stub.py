"""An SSE upstream for bench/streams.py: N chat-completion chunks a fixed gap apart, each stamped with its send time.

Usage: python -m bench.sse_stub PORT

POST any path with a JSON body ``{"n": events, "gap_ms": gap}``: a streamed (chunked) ``text/event-stream`` answer of
``n`` events then ``data: [DONE]``, and the connection closes, as llama-server's does after a stream. GET /health
answers 200 (the appliance polls it). Each event carries ``"t"``: time.monotonic_ns() just before it was written.
CLOCK_MONOTONIC is one clock for the whole machine on Linux, so a client in another process subtracts it from its own
receive time to get the event's one-way delay (perf_counter's origin is per process; wall time can be stepped).

Python rather than nginx: nginx cannot stamp events with a microsecond send time, and at a gap of milliseconds per
event the stub's own cost is not what is measured.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvloop

EVENT = ('{{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"bench","t":{t},"choices":'
         '[{{"index":0,"delta":{{"content":"token{i} "}},"finish_reason":null}}]}}')


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method = request_line.split(" ", 1)[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if method == "GET":
            ok = b'{"status":"ok"}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(ok), ok))
            return
        doc = json.loads(body)
        n, gap_s = int(doc.get("n", 100)), float(doc.get("gap_ms", 10)) / 1000
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(n):
            # A fixed schedule: the gap does not stretch by the time each write takes.
            await asyncio.sleep(max(0.0, start + i * gap_s - loop.time()))
            event = EVENT.format(t=time.monotonic_ns(), i=i)
            writer.write(_chunk(b"data: " + event.encode() + b"\n\n"))
            await writer.drain()
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass  # a client that left, or a request that is not for this stub
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
