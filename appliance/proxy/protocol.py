"""The public port's HTTP/1.1 layer: uvicorn's httptools protocol with the limits a port open to a LAN needs.

Plain uvicorn buffers a request head of any size, waits forever for a head or a body that does not come, accepts any
number of connections, drops the body of a request that asks to ``Upgrade``, and answers parser errors in plain text.
Here, per connection and below the app (so before authentication and routing):

- a head (request line and headers) may use ``max_header_bytes`` (431), its target ``max_url_bytes`` (414), and it
  may hold ``max_headers`` fields (431). The parser is never fed more than the bound, so an unfinished 8 MiB header
  line costs ``max_header_bytes``, not 8 MiB, and is refused as soon as the bound is crossed;
- a head must be complete ``header_timeout_s`` after the connection opened or, on a kept-alive connection, after the
  next request's first byte (408). A connection that sent nothing is closed without an answer: it may be a browser's
  preconnect, which would take the answer for the reply to the request it sends next. Idle kept-alive connections
  still close after gunicorn's ``keepalive``;
- a body may pause at most ``body_idle_timeout_s`` (time the proxy itself stops reading does not count); then the
  connection is dropped and the app's ``receive()`` reports ``http.disconnect``, which ends the request as a client
  abort;
- a ``Content-Length`` over ``body_limit_bytes`` is answered 413 as soon as the header is read, before any
  ``100 Continue``;
- a connection beyond ``max_connections_per_worker`` gets 503 for its first request;
- ``Upgrade`` (h2c, websocket) is declined: the request is served as HTTP/1.1, body included. CONNECT gets 405,
  versions other than HTTP/1.0 and 1.1 get 505, any other malformed request 400.

Every such answer is an OpenAI-shaped JSON error with ``Connection: close``. The connection is then half-closed and
what the client still sends is read and dropped for up to ``_LINGER_S``: a client busy sending a huge head reads the
answer instead of a reset.

Cost: a few attribute checks per read and per parser callback, about 2 us per request measured in-process (uvicorn's
own parsing and dispatch take about 6.5 us; the whole proxy about 1 ms). At most one timer per connection is armed: at
connect for the first head, then only while a head or a body stays incomplete across reads, so a request that arrives
in one read arms none.

Responses go out through ``CoalescedTransport``: a complete response's head and body in one write (uvicorn would make
two), which saves a system call and a TCP segment per request. The keep-alive deadline is one timer per connection that
checks the idle time when it fires, rather than a timer armed after every response and cancelled by the next request.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from appliance.config import ServerConfig
from appliance.metrics import proxy as metrics
from appliance.proxy.errors import error_body
from appliance.proxy.routes import is_anthropic

#: The scope key of :meth:`LimitedHttpProtocol.watch_gone`.
GONE_KEY = "appliance.watch_gone"
#: The scope key of the connection's ``CoalescedTransport``: the app sets its ``head_fields``.
HEAD_KEY = "appliance.head"
#: The scope key of the request's ASGI ``receive``: the app reads the body from it directly (see ``forward.read_body``),
#: and Falcon does not pass it on.
RECEIVE_KEY = "appliance.receive"
# How long a refused connection keeps reading (and dropping) what its client still sends after the answer.
_LINGER_S = 2.0
_VERSIONS = ("1.1", "1.0")
#: A client's X-Request-Id that is echoed (and used in logs and events); anything else is replaced by a new id.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# llhttp's reasons for a version it does not parse (HTTP/1.2, 3.0, ...) and for HTTP/2's connection preface.
_VERSION_ERRORS = frozenset({"Invalid HTTP version", "Pause on PRI/Upgrade"})


class CoalescedTransport:
    """The transport as a response cycle sees it: a response's head is held until its body's first write, so that a
    complete response leaves in one send() rather than two (uvicorn writes the head on ``http.response.start`` and
    the body on ``http.response.body``, one system call and one TCP segment each). A head whose body is not written in
    the same event-loop iteration (a stream waiting for its first event) goes out at the end of that iteration.

    ``head_fields``: header fields, raw (``name: value\r\n`` each), that the app adds to its response's head, which
    is the next write (the app sets them once it has read the request, so a ``100 Continue`` has gone out before). The
    rate-limit headers go this way: six headers through Falcon and uvicorn, encoded and checked one by one, cost more
    than the policy that computes them."""

    __slots__ = ("_held", "_loop", "head_fields", "hold_next", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.hold_next = False
        self.head_fields = b""
        self._held: bytes | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        if self.head_fields:
            # The head ends with its blank line; the fields go before it.
            data = data[:-2] + self.head_fields + b"\r\n"
            self.head_fields = b""
        if self.hold_next:
            self.hold_next = False
            self.flush()
            self._held = data
            self._loop.call_soon(self.flush)
        elif self._held is not None:
            held, self._held = self._held, None
            self.transport.writelines((held, data))
        else:
            self.transport.write(data)

    def flush(self) -> None:
        """Write what is held; called before anything else writes to the connection or closes it."""
        if self._held is not None:
            held, self._held = self._held, None
            self.transport.write(held)

    def drop(self) -> None:
        self._held = None

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _Refused(Exception):
    """Raised in a parser callback: the request gets ``status`` and the connection closes."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class LimitedHttpProtocol(HttpToolsProtocol):
    """One connection. ``limits`` is bound per worker by :func:`protocol_for`."""

    limits: ClassVar[ServerConfig]
    #: What each request's response cycle writes through (set when the connection is made).
    _out: CoalescedTransport

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        #: The head timer, the body timer or the linger timer: never more than one at a time.
        self._timer: asyncio.TimerHandle | None = None
        #: Between requests or inside a head: what arrives counts against max_header_bytes.
        self._in_head = True
        self._head_left = self.limits.max_header_bytes
        #: Bytes of the current head have arrived: its clock runs.
        self._head_begun = False
        self._in_body = False
        self._body_seen = 0.0
        #: Answered with an error (or dropped): whatever else arrives is discarded.
        self._refused = False
        self._over_cap = False
        self._declined_upgrade = False
        self._gone: asyncio.Future[None] | None = None
        #: When the last response ended, while no request is in progress: the keep-alive clock.
        self._idle_since: float | None = None
        #: The current request's Content-Length is over the limit: 413 once its head is complete.
        self._too_large = False
        #: The current request's valid X-Request-Id, echoed by an answer of the HTTP layer itself.
        self._request_id: bytes | None = None
        #: An answer for what followed complete requests in the same read, sent once their responses are.
        self._deferred: tuple[int, str, str] | None = None

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._out = CoalescedTransport(transport, self.loop)
        self._over_cap = len(self.connections) > self.limits.max_connections_per_worker
        self._timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.drop()
        self._cancel_timer()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        super().connection_lost(exc)

    def watch_gone(self) -> asyncio.Future[None]:
        """A future done when this connection is lost: how the app learns that its client left. Cheaper than a task
        waiting on ``receive()`` for ``http.disconnect``, and it tells the same thing (uvicorn learns it here too)."""
        self._gone = self.loop.create_future()
        if self.transport.is_closing():
            self._gone.set_result(None)
        return self._gone

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._out.flush()  # what the parser may write now (an error answer) must come after it
        self._idle_since = None
        view: bytes | memoryview = data
        if self._in_head:
            self._head_begun = True
            if len(data) > self._head_left:
                rest = self._feed_bounded(data)
                if rest is None:
                    return
                view = rest
            if self._in_head:
                self._head_left -= len(view)
        elif self._in_body:
            self._body_seen = self.loop.time()
        if not self._feed(view) or self._timer is not None:
            return
        # Only what stays incomplete past this read needs a clock.
        if self._head_begun:
            self._timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        elif self._in_body:
            self._body_seen = self.loop.time()
            self._timer = self.loop.call_later(self.limits.body_idle_timeout_s, self._body_timed_out)

    def _feed_bounded(self, data: bytes) -> memoryview | None:
        """Feed only what the open head may still use; the rest only once that head has ended. None: refused.

        A head that begins behind another request in the same read (pipelining) is counted from the next read on."""
        view = memoryview(data)
        while self._in_head and len(view) > self._head_left:
            cut, self._head_left = self._head_left, 0
            if not self._feed(view[:cut]):
                return None
            if self._in_head and self._head_left == 0:  # no request ended within the cut: its head is too large
                limit = self.limits.max_header_bytes
                self._refuse(431, "request_header_fields_too_large",
                             f"the request head is larger than the limit of {limit} bytes (server.max_header_bytes)")
                return None
            view = view[cut:]
        return view

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse ``data``; False when the request was refused (the connection is closing)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return self._serve_declined_upgrade(data[exc.args[0]:])
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.code, cause.message)
            elif str(exc) in _VERSION_ERRORS:
                self._refuse(505, "http_version_not_supported", "HTTP version not supported: send HTTP/1.1")
            else:
                self._refuse(400, "bad_request", f"malformed HTTP/1.1 request: {cause or exc}")
            return False
        return True

    def _serve_declined_upgrade(self, rest: bytes | memoryview) -> bool:
        """Parse the request again without its Upgrade header, then what followed it, as plain HTTP/1.1.

        httptools tells llhttp to skip the body of an Upgrade request and stops there; a fresh parser fed the same head
        minus ``Upgrade`` reads the body as usual. The rebuilt head is never longer than the one received."""
        self._declined_upgrade = False
        head = [self.parser.get_method(), b" ", self.url, b" HTTP/", self.parser.get_http_version().encode(), b"\r\n"]
        for name, value in self.headers:
            if name != b"upgrade":
                head += [name, b":", value, b"\r\n"]
        head.append(b"\r\n")
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own parser
        return self._feed(b"".join(head)) and self._feed(rest)

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        self._too_large = False
        self._request_id = None

    # on_url and on_header run for every request (on_header for every header): they inline uvicorn's own instead of
    # calling it, and add a bound each.

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_url_bytes:
            raise _Refused(414, "uri_too_long", f"the request target is longer than the limit of "
                           f"{self.limits.max_url_bytes} bytes (server.max_url_bytes)")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # llhttp keeps trailing whitespace, which is not part of the value (RFC 9110, 5.5), as uvicorn's own strips.
        value = value.rstrip(b" \t")
        if name == b"content-length":
            # llhttp has checked the value (digits only, no conflicting duplicate) before handing the header over.
            # Refused once the head is complete (still before any 100 Continue), so that the answer can echo an
            # X-Request-Id sent after it.
            self._too_large = int(value) > self.limits.body_limit_bytes
        elif name == b"x-request-id" and REQUEST_ID.match(value.decode("latin-1")):
            self._request_id = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = self._head_begun = False
        if self._timer is not None:
            self._cancel_timer()
        if self._too_large:
            raise _Refused(413, "request_too_large", f"request body is larger than the limit of "
                           f"{self.limits.body_limit_bytes} bytes (server.body_limit_bytes)")
        # Counted here rather than per header: max_header_bytes already bounds the work.
        if len(self.headers) > self.limits.max_headers:
            raise _Refused(431, "request_header_fields_too_large", f"the request has more than "
                           f"{self.limits.max_headers} header fields (server.max_headers)")
        parser = self.parser
        if parser.get_http_version() not in _VERSIONS:
            raise _Refused(505, "http_version_not_supported",
                           f"HTTP/{parser.get_http_version()} is not supported: send HTTP/1.1")
        if parser.should_upgrade():
            if parser.get_method() == b"CONNECT":
                raise _Refused(405, "method_not_allowed", "CONNECT is not supported: this server is not a proxy")
            # No other protocol is served here: the request is parsed again without Upgrade once the parser stops.
            self._declined_upgrade = True
            return
        if self._over_cap:
            raise _Refused(503, "too_many_connections", f"this server has too many open connections (more than "
                           f"{self.limits.max_connections_per_worker} per worker, server.max_connections_per_worker);"
                           " retry shortly")
        self._in_body = True
        self.scope[GONE_KEY] = self.watch_gone  # type: ignore[literal-required]
        self.scope[HEAD_KEY] = self._out  # type: ignore[literal-required]
        super().on_headers_complete()
        assert self.cycle is not None
        self.scope[RECEIVE_KEY] = self.cycle.receive  # type: ignore[literal-required]
        self.cycle.transport = self._out  # type: ignore[assignment]
        self._out.hold_next = True

    def on_message_complete(self) -> None:
        self._in_body = False
        self._in_head = True
        self._head_left = self.limits.max_header_bytes
        if self._timer is not None:
            self._cancel_timer()
        if not self._declined_upgrade:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        # uvicorn's own, except for the keep-alive deadline: uvicorn arms a timer after every response and cancels it
        # when the next request arrives (about 3 us a request); here one timer runs while the connection is in use and
        # checks, when it fires, whether the connection has been idle for the whole timeout.
        self._out.flush()
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        if self._deferred is not None:
            self._refused = False
            self._refuse(*self._deferred)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_expired)

    def _keep_alive_expired(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None:  # a request is in progress; its response arms the timer again
            return
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_expired)
        else:
            self.timeout_keep_alive_handler()

    def shutdown(self) -> None:
        self._out.flush()
        super().shutdown()

    # Timers and refusals

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._head_begun:
            self._refuse(408, "request_timeout", f"the request head was not complete within "
                         f"{self.limits.header_timeout_s:g} s (server.header_timeout_s)")
        else:
            self._refused = True
            self.transport.close()

    def _body_timed_out(self) -> None:
        now = self.loop.time()
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            self._body_seen = now  # the proxy is not reading (or has not yet said 100 Continue): not the client's pause
        left = self._body_seen + self.limits.body_idle_timeout_s - now
        if left > 0:
            self._timer = self.loop.call_later(left, self._body_timed_out)
            return
        self._timer = None
        self._refused = True
        self.logger.info("%sno request body bytes for %g s (server.body_idle_timeout_s): connection dropped",
                         self._peer(), self.limits.body_idle_timeout_s)
        # connection_lost() then tells the app (http.disconnect), which ends the request as a client abort.
        self.transport.abort()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` and close the connection; drop whatever else arrives on it."""
        self._out.flush()
        self._refused = True
        self._cancel_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete and self._deferred is None:
            # Complete requests came before it in the same read: they are answered first, then this.
            self._deferred = (status, code, message)
            return
        self.logger.info("%s%d %s", self._peer(), status, message)
        metrics.HTTP_REFUSED.labels(str(status)).inc()
        if self.pipeline or (cycle is not None and cycle.response_started and not cycle.response_complete):
            # A response is being sent (pipelining): nothing can be written in between.
            self.transport.close()
            return
        if cycle is not None and not cycle.response_complete:
            # The request whose body was being read loses its client: receive() says http.disconnect, send() is a no-op.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(self._error_response(status, code, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(_LINGER_S, self.transport.close)
        else:  # TLS has no half-close
            self.transport.close()

    def _error_response(self, status: int, code: str, message: str) -> bytes:
        # An Anthropic client gets Anthropic's shape here too (a Content-Length over the limit, for one).
        body = error_body(status, message, code, is_anthropic(self.url.partition(b"?")[0].decode("latin-1")))
        parts = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            parts += [name, b": ", value, b"\r\n"]
        parts += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                  b"\r\nx-request-id: ", self._request_id or uuid.uuid4().hex.encode(), b"\r\nconnection: close\r\n"]
        if status == 503:
            parts.append(b"retry-after: 1\r\n")
        parts += [b"\r\n", body]
        return b"".join(parts)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]} - " if self.client else ""


def protocol_for(server: ServerConfig) -> type[LimitedHttpProtocol]:
    """The protocol class for uvicorn's ``Config.http``, with the limits of ``server``."""

    class Configured(LimitedHttpProtocol):
        limits = server

    return Configured
