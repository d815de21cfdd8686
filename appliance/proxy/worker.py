"""The gunicorn worker: uvicorn-worker's UvicornWorker with a draining phase on SIGTERM.

On SIGTERM a plain uvicorn worker closes its listening socket at once, so a load balancer polling /health sees a
refused connection instead of "draining". Here the first SIGTERM only flips the app to draining (503 on /health and on
new work) and the worker exits once in-flight requests and streams have finished, or when the grace period ends.

A worker that gunicorn replaces on SIGHUP (``appliance reload``) retires instead: new workers already serve on the same
socket, so it closes its own copy of it at once (and says so, for ``appliance reload``), still serves what arrives on
its open connections but closes each one after its response, and exits when its last connection is gone (see
``retire.py``). Closing idle connections itself would reset those accepted an instant before the socket closed, whose
request is still on its way. Either way the main loop keeps ticking, so the arbiter keeps hearing from the worker and
does not kill it for silence while a stream finishes.

A worker whose arbiter died (SIGKILL, the OOM killer) retires the same way, on its own: nobody would ever stop it, and
while it listens a restarted proxy cannot bind the port.

Connections are served by ``protocol.LimitedHttpProtocol`` (uvicorn's httptools protocol with bounded heads, timeouts
and a connection cap), configured from the app's config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from types import FrameType
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from appliance.proxy import retire
from appliance.proxy.app import ProxyApp
from appliance.proxy.protocol import protocol_for

log = logging.getLogger("uvicorn.error")  # uvicorn-worker sends it to gunicorn's error log


class DrainingServer(Server):
    def __init__(self, config: Config, app: ProxyApp, grace_s: float, arbiter_pid: int) -> None:
        super().__init__(config)
        self._app = app
        self._grace_s = grace_s
        self._arbiter_pid = arbiter_pid
        self._drain_started: float | None = None
        self._retiring = False
        self._cut_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acknowledged = False  # that this retiring worker has closed its listening socket (see retire.py)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _stop(self, retiring: bool) -> None:
        self._drain_started = time.monotonic()
        self._retiring = retiring
        self._app.runtime.closing = True
        if not retiring:
            self._app.runtime.draining = True

    def _close_listeners(self) -> None:
        for server in self.servers:
            server.close()  # idempotent
        if not self._acknowledged:
            retire.acknowledge(retire.retired_file(self._app.runtime.cfg), os.getpid())
            self._acknowledged = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM:
            # supervisord stops the proxy as a process group, so a worker gets SIGTERM twice (from supervisord and
            # from the arbiter): only the first counts. SIGINT/SIGQUIT still mean "now"; the arbiter's SIGKILL after
            # graceful_timeout bounds a drain that never ends.
            if self._drain_started is None:
                self._stop(retiring=retire.is_marked(retire.retiring_file(self._app.runtime.cfg), os.getpid()))
                if self._retiring and self._loop is not None:
                    # Stop accepting now rather than at the next tick (up to 0.1 s): the new workers already accept,
                    # and until this closes, a new connection may still get this worker's old settings. This runs
                    # in a signal handler, where the loop may be mid-step: the close is scheduled on it.
                    self._loop.call_soon_threadsafe(self._close_listeners)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        # Runs on the event loop, not in the signal handler, where closing asyncio servers is not safe.
        if self._drain_started is None and os.getppid() != self._arbiter_pid:
            log.warning("the gunicorn arbiter (pid %d) is gone: no longer accepting connections, exiting once the "
                        "open ones are done", self._arbiter_pid)
            self._stop(retiring=True)
        if self._drain_started is not None:
            if self._retiring:
                self._close_listeners()
                done = not self.server_state.connections
            else:
                done = self._app.runtime.in_flight <= 0
            now = time.monotonic()
            if done or (self._cut_at is not None and now - self._cut_at >= 1.0):
                self.should_exit = True
            elif self._cut_at is None and now - self._drain_started >= self._grace_s:
                # Requests still running get their ending (an SSE error event, a 503) before the worker exits; left
                # to uvicorn's shutdown they would be cancelled in the middle of a write.
                self._app.runtime.cut()
                self._cut_at = now
        return await super().on_tick(counter)


class ApplianceWorker(UvicornWorker):  # type: ignore[misc]
    # "http" is set in _serve, from the app's config; no WebSocket is served.
    # No "Server: uvicorn" header: it tells a scanner on the LAN what to try.
    # No X-Forwarded-For handling: nothing here uses the client's address, and uvicorn's middleware for it would be
    # one more layer on every request.
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "uvloop", "ws": "none", "lifespan": "on",
                                               "server_header": False, "proxy_headers": False}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # gunicorn's graceful_timeout is not passed to uvicorn. The drain phase gets most of it; uvicorn's own
        # shutdown only has idle connections left to close.
        self.grace_s = max(1.0, float(self.cfg.graceful_timeout) - 5.0)
        self.config.timeout_graceful_shutdown = 3

    async def _serve(self) -> None:
        self.config.app = self.wsgi.falcon  # see ProxyApp
        self.config.http = protocol_for(self.wsgi.runtime.cfg.server)
        server = DrainingServer(self.config, self.wsgi, self.grace_s, self.ppid)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            raise SystemExit(3)  # gunicorn's Arbiter.WORKER_BOOT_ERROR
