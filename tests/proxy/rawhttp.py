"""Raw-socket HTTP/1.1 for tests that need what no client library sends: broken, slow or oversized requests."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    #: Bytes that came after this response on the same connection (the next pipelined response).
    rest: bytes = b""
    #: The server closed the connection (EOF or reset) within the read's time limit.
    closed: bool = False
    #: Status codes of the 1xx responses that came first (100 Continue).
    interim: list[int] = field(default_factory=list)

    def error(self) -> dict[str, Any]:
        """The OpenAI error object, checking the shape and the content type on the way."""
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        doc = json.loads(self.body)
        assert set(doc) == {"error"}, doc
        err: dict[str, Any] = doc["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str) and isinstance(err["code"], str) and err["param"] is None
        return err


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def send(s: socket.socket, data: bytes) -> bool:
    """sendall; False when the server already closed the connection (it may still have answered: read that)."""
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends within ``timeout``; and whether it closed the connection in that time."""
    out = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            return out, False
        except ConnectionResetError:
            return out, True
        if not chunk:
            return out, True
        out += chunk
    return out, False


def parse(data: bytes, closed: bool = False) -> Response:
    """The first final response in ``data`` (1xx interim responses are listed, then skipped)."""
    interim: list[int] = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"no complete response head in {data[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status >= 200:
            break
        interim.append(status)
        data = rest
    length = int(headers.get("content-length", "0"))
    return Response(status, headers, rest[:length], rest[length:], closed, interim)


def exchange(port: int, raw: bytes, timeout: float = 5.0) -> Response:
    """Send ``raw`` on a new connection and read until the server closes it (or ``timeout``)."""
    with connect(port) as s:
        send(s, raw)
        data, closed = read_until_closed(s, timeout)
    return parse(data, closed)


def read_responses(s: socket.socket, count: int, timeout: float = 5.0) -> list[Response]:
    """``count`` responses with a Content-Length from a connection that stays open (pipelined ones included)."""
    data = b""
    out: list[Response] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        if b"\r\n\r\n" in data:
            r = parse(data)
            if len(r.body) == int(r.headers.get("content-length", "0")):
                out.append(r)
                data = r.rest
                continue
        left = deadline - time.monotonic()
        assert left > 0, f"no complete response within {timeout} s: {data[:300]!r}"
        s.settimeout(left)
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {data[:300]!r}"
        data += chunk
    return out


def read_response(s: socket.socket, timeout: float = 5.0) -> Response:
    return read_responses(s, 1, timeout)[0]


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a gunicorn arbiter's workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
