"""The one interface between the proxy and llama-server children: a small HTTP/1.1 client on asyncio and httptools.

A general-purpose client spends most of a proxied request's cost on what this link never needs (redirects, cookies,
proxies, TLS, compression, tracing hooks, per-request timeout objects). Measured alone against one fast server at 16
concurrent requests (``bench.upstream_clients``): aiohttp about 70 µs of CPU per request, httpx more than 1 ms, this
client about 11 µs, where the whole proxy spends about 200 µs. What the link to llama-server needs is small: plain
HTTP/1.1 to 127.0.0.1, one request at a time per connection, bodies with a Content-Length or chunked, kept-alive
connections reused. Responses are read by httptools (llhttp, the parser uvicorn reads requests with).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

#: An idle kept-alive connection is dropped after this long: below llama-server's own idle timeout (5 s), so that the
#: pool drops a connection before the server does rather than racing it.
KEEPALIVE_S = 3.0
CONNECT_TIMEOUT_S = 5.0
# Reading from llama-server pauses while this much of a body waits for a slow client.
_HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """The child could not be reached or broke the connection. ``kind``: refused, reset or timeout."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class Broken(ConnectionError):
    """The connection to llama-server broke (or the proxy closed it) before the response ended."""


class _Connection(asyncio.Protocol):
    """One connection to a child, carrying one exchange at a time; the parser's callbacks fill the response in."""

    transport: asyncio.Transport

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: list[_Connection], open_: set[_Connection]) -> None:
        self.loop = loop
        self.idle = idle  # the pool's idle list for this address, left when the connection is lost
        self.open = open_
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.lost = False
        self.busy = False
        self.head: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.limit = _HIGH_WATER
        self.paused = False
        self.complete = False
        self.keep_alive = False
        self.answered = False
        self.error: Broken | None = None
        self.waiter: asyncio.Future[None] | None = None

    def begin(self) -> asyncio.Future[None]:
        """A new exchange: returns the future done when the response headers have arrived."""
        self.busy = True
        self.status = 0
        self.headers = {}
        self.limit = _HIGH_WATER
        self.complete = self.answered = self.keep_alive = False
        self.error = None
        self.head = self.loop.create_future()
        return self.head

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        await self.waiter

    def take(self) -> bytes:
        """Everything of the body that has arrived, in one piece; reading resumes if it was paused."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        return data

    def finish(self, error: Broken | None) -> None:
        """The exchange is over (body read, or abandoned): keep nothing of it."""
        self.busy = False
        self.chunks.clear()
        self.buffered = 0
        if error is not None and self.error is None and not self.complete:
            self.error = error
        self.wake()

    def drop(self, error: Broken | None = None) -> None:
        """Abandon the exchange and close the connection (llama-server sees it close)."""
        self.finish(error)
        self.transport.close()

    def park(self) -> None:
        """The exchange ended cleanly and the connection stays open: back into the pool."""
        self.finish(None)
        self.idle_since = self.loop.time()
        self.idle.append(self)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.open.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing asked: a server closing an idle connection with a 408, say
            self.transport.abort()
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._broke(f"llama-server sent a malformed response: {e}")
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.open.discard(self)
        with contextlib.suppress(ValueError):
            self.idle.remove(self)
        if not self.busy or self.complete:
            return
        if self.head is not None and not self.head.done():
            self._broke("llama-server closed the connection without answering")
        elif "content-length" not in self.headers and "transfer-encoding" not in self.headers:
            self.complete = True  # a body delimited by the end of the connection
            self.wake()
        else:
            self._broke("llama-server closed the connection before the body ended")

    def _broke(self, reason: str) -> None:
        error = Broken(reason)
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        elif self.error is None:
            self.error = error
            self.wake()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # an interim response (never asked for): the real one follows
            self.headers = {}
            return
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > self.limit and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # asked here: the parser forgets it after this call
            self.wake()


class UpstreamResponse:
    """Status, headers (names in lower case) and the body, passed through as it arrives."""

    __slots__ = ("_conn", "_done", "headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._done = False
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers

    def chunks(self) -> UpstreamResponse:
        """The body's chunks as they arrive (whatever has arrived, in one piece); a broken connection, or ``close()``
        while a read waits, raises :class:`Broken`."""
        return self

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        while True:
            if conn.chunks:
                return conn.take()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                raise StopAsyncIteration
            await conn.wait()

    async def read(self) -> bytes:
        """The whole body (for bodies whose length is known and bounded); the connection is then released."""
        conn = self._conn
        conn.limit = 1 << 62  # read whole: no pause
        parts = [conn.take()]  # (which also resumes reading, were it paused)
        while not conn.complete:
            if conn.error is not None:
                raise UpstreamError("reset", f"connection to llama-server broke: {conn.error}")
            await conn.wait()
        parts.append(conn.take())
        self.release()
        return b"".join(parts)

    def close(self) -> None:
        """Drop the connection: llama-server sees the socket close and frees the slot. A pending read ends at once."""
        if not self._done:
            self._done = True
            self._conn.drop(Broken("the response was closed by the proxy"))

    def release(self) -> None:
        """Body fully read: return the connection to the pool, unless it is about to be closed.

        llama-server closes a connection after a streamed (chunked) response without saying so; a client that reused
        it would fail the next request. Only responses with a Content-Length leave a reusable one."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.keep_alive and not conn.chunks and not conn.lost and "content-length" in conn.headers:
            conn.park()
        else:
            conn.drop()


class Upstream:
    """The connections of one worker process to its children (created inside the worker's event loop)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        #: (method, url) -> (address, the request line and Host header)
        self._targets: dict[tuple[str, str], tuple[tuple[str, int], bytes]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for conn in list(self._open):
            conn.transport.close()
        self._idle.clear()

    async def _sweep(self) -> None:
        """Close connections idle for KEEPALIVE_S, before llama-server's own idle timeout closes them."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            for idle in self._idle.values():
                for conn in [c for c in idle if now - c.idle_since >= KEEPALIVE_S]:
                    idle.remove(conn)
                    conn.transport.close()

    def _target(self, method: str, url: str) -> tuple[tuple[str, int], bytes]:
        found = self._targets.get((method, url))
        if found is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or parts.hostname is None or parts.port is None:
                raise ValueError(f"{url}: only http://host:port/... is supported")
            path = parts.path + ("?" + parts.query if parts.query else "")
            line = f"{method} {path or '/'} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n".encode("latin-1")
            found = self._targets[(method, url)] = ((parts.hostname, parts.port), line)
        return found

    def _pooled(self, address: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(address)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to have been closed
                if now - conn.idle_since < KEEPALIVE_S:
                    return conn
                conn.transport.close()
        return None

    async def _connect(self, address: tuple[str, int], url: str) -> _Connection:
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault(address, [])
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(lambda: _Connection(loop, idle, self._open), *address)
        except TimeoutError:  # before OSError: it is one
            raise UpstreamError("refused", f"cannot connect to {url}: no answer within {CONNECT_TIMEOUT_S:g} s"
                                ) from None
        except OSError as e:
            raise UpstreamError("refused", f"cannot connect to {url}: {e}") from e
        return conn

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str], pooled: bool = True
                   ) -> UpstreamResponse:
        """Send a request; returns once the response headers have arrived. Only the given headers are sent, besides
        Host and Content-Length. ``pooled=False``: on a connection of its own, whatever the pool holds.

        A pooled connection that the server closed while it sat idle fails the next request before any answer. That
        request is sent once more on a fresh connection: llama-server reads a request whole before it acts on it, and
        a server that died with the request in hand is not listening to receive the second copy (refused).
        Cancelling the wait (the client left, a deadline) closes the connection, which llama-server sees."""
        address, line = self._target(method, url)
        parts = [line]
        for name, value in headers.items():
            parts += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
        if body is not None:
            parts += [b"Content-Length: ", str(len(body)).encode(), b"\r\n"]
        parts.append(b"\r\n")
        head = b"".join(parts)
        for attempt in (1, 2):
            conn = self._pooled(address) if attempt == 1 and pooled else None
            if conn is None:
                conn = await self._connect(address, url)
            answered = conn.begin()
            if body:
                conn.transport.writelines((head, body))
            else:
                conn.transport.write(head)
            try:
                await answered
            except Broken as e:
                conn.drop()
                if attempt == 1 and not conn.answered:
                    continue
                raise UpstreamError("reset", f"{url} closed the connection without answering: {e}") from e
            except BaseException:
                conn.drop()
                raise
            return UpstreamResponse(conn)
        raise AssertionError("unreachable")

    async def health(self, base_url: str, timeout_s: float) -> int | None:
        """Status of the child's ``/health``, or None when it cannot be reached.

        On a connection of its own, closed after the answer. A kept-alive connection is not free for llama-server:
        its HTTP library wakes the connection's thread every 10 ms to check it, and with a poll every second from
        every worker there always was one per worker; a stream sent on such a connection (the pool's most recent)
        found the model's prompt evaluation slower in most rounds of ``bench.real_model`` (38-45 ms instead of
        31-33 for the same prompt, per llama-server's own timings), which polls that keep no connection ended."""
        try:
            async with asyncio.timeout(timeout_s):
                r = await self.send("GET", base_url + "/health", None, {"Connection": "close"}, pooled=False)
                try:
                    await r.read()
                finally:
                    r.close()  # a no-op once read
                return r.status
        except (UpstreamError, TimeoutError):
            return None
