"""What the fault and soak suites share: clients that record what they saw, process trees and sockets read from
/proc, a switchable event collector, a small tmpfs.

Other test sessions run on the same machine: everything here looks only at processes under one appliance's own
supervisord and at sockets on its own ports.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import Appliance
from tests.helpers import free_port, samples

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def wait_for(predicate: Callable[[], object], timeout: float, what: str | Callable[[], str],
             interval: float = 0.1) -> None:
    """Until ``predicate()`` is true; else TimeoutError with ``what`` (a callable: evaluated then, for a message that
    shows the state at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what() if callable(what) else what} (after {timeout:g} s)")


def scrape(app: Appliance) -> Samples:
    r = httpx.get(f"http://127.0.0.1:{app.doc['metrics']['port']}/metrics", timeout=10)
    r.raise_for_status()
    return samples(r.text)


# --- clients -------------------------------------------------------------------------------------------------------


@dataclass
class StreamOutcome:
    """What one streaming client saw, from its request to the end of the response (or the exception)."""

    status: int | None = None
    events: int = 0
    done: bool = False  # the stream ended with `data: [DONE]`
    error: Any = None  # the `error` object of an SSE error event or of a JSON error body
    exception: str | None = None
    ended: float = 0.0  # time.monotonic() at the end

    @property
    def clean(self) -> bool:
        """A complete stream, a stream that ends with an SSE error event, or an error status with an OpenAI body."""
        if self.exception is not None:
            return False
        if self.status == 200:
            return self.done or self.error is not None
        return self.error is not None


def stream(url: str, body: dict[str, Any], started: threading.Event | None = None, timeout: float = 120
           ) -> StreamOutcome:
    """POST a streaming request and read it to the end; ``started`` is set at the first SSE event."""
    out = StreamOutcome()
    try:
        with httpx.Client(timeout=timeout) as c, c.stream("POST", url, json={**body, "stream": True}) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = json.loads(r.read())["error"]
                return out
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    continue
                doc = json.loads(line[6:])
                out.events += 1
                if started is not None:
                    started.set()
                if "error" in doc:
                    out.error = doc["error"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        out.exception = repr(e)
    finally:
        out.ended = time.monotonic()
    return out


# --- processes and sockets, from /proc ------------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out |= {int(p) for p in (task / "children").read_text().split()}
    return out


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _tcp_sockets() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket; state 0A is LISTEN, 01 ESTABLISHED."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        out.append((int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16), f[3], int(f[9])))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def listeners(port: int) -> set[int]:
    """PIDs holding a listening socket on ``port`` (any process on the machine: the port is this test's own)."""
    inodes = {ino for local, _, state, ino in _tcp_sockets() if local == port and state == "0A"}
    if not inodes:
        return set()
    return {int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _socket_inodes(int(d.name)) & inodes}


def client_ports(pid: int, port: int) -> set[int]:
    """Remote (client) ports of the connections that ``pid`` holds on its local ``port``."""
    mine = _socket_inodes(pid)
    return {remote for local, remote, state, ino in _tcp_sockets() if local == port and state == "01" and ino in mine}


def status_kb(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (VmRSS, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def belongs_to(pid: int, app: Appliance) -> bool:
    """The process runs with this appliance's config (its command line or, for gunicorn workers, its environment)."""
    try:
        seen = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return str(app.config).encode() in seen


def appliance_processes(app: Appliance) -> set[int]:
    """`appliance up`, its supervisord and everything below them."""
    return {app.proc.pid} | descendants(app.proc.pid)


# --- event log faults -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (needs root), always unmounted again."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        # Lazy: a writer that still has a file open there must not leave the mount behind.
        subprocess.run(["umount", "--lazy", str(path)], check=True)


class Collector:
    """An HTTP event collector on 127.0.0.1 whose behaviour a test switches: ``ok`` answers 200, ``hang`` accepts
    and never answers, ``down`` refuses connections (nothing listens on its port)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.received = 0
        self._release = threading.Event()  # ends the handlers that hang
        self._server: http.server.ThreadingHTTPServer | None = None
        self.mode = "down"

    def set_mode(self, mode: str) -> None:
        if mode == "down":
            self._stop()
        elif self._server is None:
            self._start()
        if mode == "hang":
            self._release.clear()
        else:
            self._release.set()
        self.mode = mode

    def _start(self) -> None:
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if collector.mode == "hang":
                    collector._release.wait(60)
                    return
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                collector.received += len(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _stop(self) -> None:
        if self._server is not None:
            self._release.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self._stop()
