"""The one interface between the proxy and llama-server children.

aiohttp is used rather than httpx: on this kind of machine a Falcon proxy under gunicorn measured 1,890 vs 540 req/s
at one connection and 3,870 vs 320 req/s at 16 (see README and bench/). Everything that depends on the client library
lives in this module, so swapping it means rewriting one small file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp


class UpstreamError(Exception):
    """The child could not be reached or broke the connection. ``kind``: refused, reset or timeout."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


#: What reading a body raises when the connection to llama-server breaks.
BROKEN = (aiohttp.ClientError, ConnectionError)


class UpstreamResponse:
    """Status, headers and the body as an async iterator of chunks, passed through as they arrive."""

    def __init__(self, raw: aiohttp.ClientResponse) -> None:
        self._raw = raw
        self.status = raw.status
        self.headers: Mapping[str, str] = raw.headers

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive; a broken connection raises one of ``BROKEN``. The library's own iterator
        rather than a generator around it that would translate errors: this runs once per SSE event."""
        return self._raw.content.iter_any()

    async def read(self) -> bytes:
        """The whole body (for small bodies whose length is known)."""
        try:
            return await self._raw.read()
        except BROKEN as e:
            raise UpstreamError("reset", f"connection to llama-server broke: {e}") from e

    def close(self) -> None:
        """Drop the connection: llama-server sees the socket close and frees the slot."""
        self._raw.close()

    def release(self) -> None:
        """Body fully read: return the connection to the pool, unless it is about to be closed.

        llama-server closes a connection after a streamed (chunked) response without saying so; a pooled client
        that reused it would fail the next request. Only responses with a Content-Length leave a reusable one."""
        if "content-length" in self.headers:
            self._raw.release()
        else:
            self._raw.close()


class Upstream:
    """One pooled client per worker process (created inside the worker's event loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # keepalive_timeout below llama-server's own idle timeout (5 s), so that the pool drops a connection before
        # the server does rather than racing it.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3, enable_cleanup_closed=True)
        # total=None: generation may stream for minutes; the wait for response headers is bounded by the caller.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,  # bytes pass through verbatim
            # One client serves every user: a cookie set in one answer must never ride along with another's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Forward exactly the headers the client sent: no library defaults (Accept, Content-Type, ...).
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not awaited")
        return self._session

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> UpstreamResponse:
        """Send a request; returns once the response headers have arrived.

        A pooled connection that the server closed while it sat idle fails the next request before any answer. That
        request is sent once more on a fresh connection: llama-server reads a request whole before it acts on it, and
        a server that died with the request in hand is not listening to receive the second copy (refused)."""
        for attempt in (1, 2):
            try:
                raw = await self.session.request(method, url, data=body, headers=headers, allow_redirects=False)
            except aiohttp.ClientConnectorError as e:
                raise UpstreamError("refused", f"cannot connect to {url}: {e.os_error}") from e
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # Closed under us while the request was written or before any answer ("Can not write request
                # body", a reset): nothing was answered, so nothing was done.
                if attempt == 1:
                    continue
                raise UpstreamError("reset", f"{url} closed the connection without answering: {e!r}") from e
            except (aiohttp.ClientError, ConnectionError) as e:
                raise UpstreamError("reset", f"{url} failed: {e!r}") from e
            return UpstreamResponse(raw)
        raise AssertionError("unreachable")

    async def health(self, base_url: str, timeout_s: float) -> int | None:
        """Status of the child's ``/health``, or None when it cannot be reached."""
        try:
            async with self.session.get(base_url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            return None
