"""The public port's HTTP layer under real gunicorn: bounded request heads, timeouts, the connection cap, declined
upgrades, malformed requests and orphaned workers. Raw sockets, since no client library sends what is tested here."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Proxy, stub_config, write_config
from tests.proxy import rawhttp
from tests.proxy.rawhttp import connect, exchange, read_response, read_responses, read_until_closed, request, send
from tests.stub_llama import FIXED_RESPONSE, StubLlama

KEY = "sk-http-layer"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_HEAD = 16384
MAX_URL = 4096
MAX_HEADERS = 30
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def limited(stubs: tuple[StubLlama, StubLlama], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp: Path = tmp_path_factory.mktemp("http-layer")
    (tmp / "keys").write_text(KEY + "\n")
    doc = stub_config(tmp, stubs[0].port, stubs[1].port, api_keys_file=str(tmp / "keys"),
                      body_limit_bytes=BODY_LIMIT, max_header_bytes=MAX_HEAD, max_url_bytes=MAX_URL,
                      max_headers=MAX_HEADERS, header_timeout_s=1.0, body_idle_timeout_s=1.0)
    p = Proxy(write_config(tmp / "appliance.toml", doc), doc["server"]["port"]).start()
    yield p
    p.stop()


def head_of_size(size: int, method: str = "GET", path: str = "/livez") -> bytes:
    """A complete request head of exactly ``size`` bytes, padded in one header."""
    base = request(method, path, headers={**AUTH, "X-Pad": ""})
    assert len(base) <= size
    return base[:-4] + b"a" * (size - len(base)) + b"\r\n\r\n"


def workers_of(p: Proxy, count: int) -> list[int]:
    """The worker pids, once all ``count`` have started serving (the first one to do so makes Proxy.start return)."""
    assert p.proc is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = rawhttp.children(p.proc.pid)
        log = p.log.read_text()
        if len(pids) == count and all(f"[{pid}] [INFO] Application startup complete" in log for pid in pids):
            return pids
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not start: {p.log.read_text()}")


def event_of(p: Proxy, request_id: str) -> dict[str, object]:
    """The app's event for the request with this X-Request-Id (events are written in batches, about once a second)."""
    events = p.config_path.parent / "run" / "events.jsonl"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if events.exists():
            for line in events.read_text().splitlines():
                if request_id in line:
                    event: dict[str, object] = json.loads(line)
                    return event
        time.sleep(0.2)
    raise AssertionError(f"no event for request {request_id}")


def assert_closed(r: rawhttp.Response) -> None:
    assert r.closed, "the server left the connection open"
    assert r.headers.get("connection") == "close"


# --- 1. bounded request heads --------------------------------------------------------------------------------------


def test_head_at_the_limit_is_served_one_byte_more_gets_431(limited: Proxy) -> None:
    assert exchange(limited.port, head_of_size(MAX_HEAD) + request("GET", "/livez", headers={"Connection": "close"})
                    ).status == 200
    r = exchange(limited.port, head_of_size(MAX_HEAD + 1))
    assert r.status == 431
    assert r.error()["code"] == "request_header_fields_too_large"
    assert "server.max_header_bytes" in r.error()["message"]
    assert_closed(r)


def test_oversized_head_is_refused_before_it_ends_and_before_authentication(limited: Proxy) -> None:
    # 4 MiB of one header that never ends: the answer must not wait for the rest (nor for the key check).
    with connect(limited.port) as s:
        send(s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 << 20))
        data, closed = read_until_closed(s, 5)
    r = rawhttp.parse(data, closed)
    assert r.status == 431
    assert_closed(r)


def test_url_over_max_url_bytes_gets_414(limited: Proxy) -> None:
    path = "/livez?q=" + "a" * MAX_URL
    r = exchange(limited.port, request("GET", path, headers=AUTH))
    assert r.status == 414
    assert r.error()["code"] == "uri_too_long"
    assert_closed(r)
    # Also when the request line never ends.
    with connect(limited.port) as s:
        send(s, b"GET /livez?q=" + b"a" * (1 << 20))
        data, closed = read_until_closed(s, 5)
    assert rawhttp.parse(data, closed).status == 414


def test_header_count_is_bounded(limited: Proxy) -> None:
    # Host, Authorization and Connection are three of them.
    at_limit = {f"X-H{i}": "v" for i in range(MAX_HEADERS - 3)}
    r = exchange(limited.port, request("GET", "/livez", headers={**AUTH, **at_limit, "Connection": "close"}))
    assert r.status == 200
    over = {f"X-H{i}": "v" for i in range(MAX_HEADERS - 1)}
    r = exchange(limited.port, request("GET", "/livez", headers={**AUTH, **over}))
    assert r.status == 431
    assert "server.max_headers" in r.error()["message"]
    assert_closed(r)
    # Ten thousand of them cross max_header_bytes first.
    many = {f"X-H{i}": "v" for i in range(10_000)}
    r = exchange(limited.port, request("GET", "/livez", headers={**AUTH, **many}))
    assert r.status == 431
    assert_closed(r)


def test_unfinished_huge_heads_cost_no_memory_and_are_closed(limited: Proxy) -> None:
    workers = workers_of(limited, 2)
    before = sum(rawhttp.rss_kib(w) for w in workers)
    line = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20)
    socks = [connect(limited.port) for _ in range(10)]
    try:
        for s in socks:
            send(s, line)
        time.sleep(1.0)  # let the workers read (and, unfixed, keep) what was sent
        grown_kib = sum(rawhttp.rss_kib(w) for w in workers) - before
        results = [read_until_closed(s, 5) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert grown_kib < 10 * 1024, f"workers grew by {grown_kib} KiB for 10 unfinished heads"
    for data, closed in results:
        assert closed
        assert rawhttp.parse(data, closed).status == 431


# --- 2. timeouts and the connection cap ----------------------------------------------------------------------------


def test_incomplete_heads_time_out_while_others_are_served(limited: Proxy) -> None:
    served: list[int | str] = []
    stop = threading.Event()

    def normal_traffic() -> None:
        with httpx.Client(base_url=limited.url, headers=AUTH, timeout=10) as client:
            while not stop.is_set() and len(served) < 500:
                try:
                    served.append(client.get("/v1/models").status_code)
                except httpx.HTTPError as e:
                    served.append(repr(e))
                time.sleep(0.05)

    traffic = threading.Thread(target=normal_traffic)
    traffic.start()
    silent = [connect(limited.port) for _ in range(20)]
    half_line = [connect(limited.port) for _ in range(20)]
    dribbling = [connect(limited.port) for _ in range(20)]
    try:
        for s in half_line:
            send(s, b"GET /v1/mo")
        head = request("GET", "/v1/models", headers=AUTH)
        # One byte per socket every 0.2 s: each keeps sending, none finishes its head within the timeout.
        deadline = time.monotonic() + 2.0
        i = 0
        while time.monotonic() < deadline and i < len(head) - 1:
            for s in dribbling:
                send(s, head[i:i + 1])
            i += 1
            time.sleep(0.2)
        results = {name: [read_until_closed(s, 8) for s in socks]
                   for name, socks in (("silent", silent), ("half", half_line), ("dribbling", dribbling))}
    finally:
        stop.set()
        traffic.join(20)
        for s in silent + half_line + dribbling:
            s.close()
    for name, outcome in results.items():
        assert all(closed for _, closed in outcome), f"{name} connections left open"
    # A connection that sent nothing is closed without an answer (it may be a browser's preconnect); the others get 408.
    assert all(data == b"" for data, _ in results["silent"])
    for data, closed in results["half"] + results["dribbling"]:
        r = rawhttp.parse(data, closed)
        assert r.status == 408 and r.error()["code"] == "request_timeout"
        assert r.headers["connection"] == "close"
    assert served and set(served) == {200}, served


def test_header_clock_starts_at_the_next_requests_first_byte(limited: Proxy) -> None:
    with connect(limited.port) as s:
        send(s, request("GET", "/livez"))
        assert read_response(s).status == 200
        time.sleep(1.5)  # idle keep-alive longer than header_timeout_s: not a slow head
        send(s, request("GET", "/livez"))
        assert read_response(s).status == 200
        send(s, b"GET /livez HTTP/1.1\r\n")  # this head never ends
        data, closed = read_until_closed(s, 5)
    assert closed and rawhttp.parse(data, closed).status == 408


def test_idle_keep_alive_still_closes_after_gunicorns_keepalive(limited: Proxy) -> None:
    with connect(limited.port) as s:
        send(s, request("GET", "/livez"))
        assert read_response(s).status == 200
        t0 = time.monotonic()
        data, closed = read_until_closed(s, 15)
    assert closed and data == b""
    assert 3.0 < time.monotonic() - t0 < 12.0  # gunicorn's keepalive is 5 s


def test_a_connection_in_use_outlives_the_keepalive_and_closes_once_idle(limited: Proxy) -> None:
    # One keep-alive timer per connection, which checks the idle time when it fires: a connection used more often than
    # the timeout, for longer than it, stays open; once idle for the whole timeout it closes.
    with connect(limited.port) as s:
        t0 = time.monotonic()
        for _ in range(16):  # 8 s of requests half a second apart; gunicorn's keepalive is 5 s
            send(s, request("GET", "/livez"))
            assert read_response(s).status == 200
            time.sleep(0.5)
        assert time.monotonic() - t0 > 7.5
        t1 = time.monotonic()
        data, closed = read_until_closed(s, 15)
    assert closed and data == b""
    assert 3.0 < time.monotonic() - t1 < 12.0


def test_stalled_body_ends_the_request_as_a_client_abort(limited: Proxy, chat_stub: StubLlama) -> None:
    with connect(limited.port) as s:
        send(s, request("POST", "/v1/chat/completions", headers={**AUTH, "X-Request-Id": "stalled-body-1",
                                                                 "Content-Length": "200"}) + b'{"model":')
        data, closed = read_until_closed(s, 6)
    assert closed and data == b""
    assert not chat_stub.received, "a truncated body was forwarded"
    # The app was told (http.disconnect) and recorded a client abort.
    assert event_of(limited, "stalled-body-1")["status"] == 499


def test_slow_body_without_long_gaps_is_served(limited: Proxy, chat_stub: StubLlama) -> None:
    body = json.dumps({"model": "chat-a", "pad": "x" * 100}).encode()
    with connect(limited.port) as s:
        send(s, request("POST", "/v1/chat/completions", headers=AUTH)[:-2]
             + f"Content-Length: {len(body)}\r\n\r\n".encode())
        # About 2.4 s in all, twice body_idle_timeout_s, but never more than 0.3 s between two pieces.
        for i in range(0, len(body), 16):
            send(s, body[i:i + 16])
            time.sleep(0.3)
        r = read_response(s)
    assert r.status == 200 and r.body == FIXED_RESPONSE
    assert chat_stub.received[-1].body == body


def test_connections_over_the_per_worker_cap_get_json_503(stubs: tuple[StubLlama, StubLlama], tmp_path: Path
                                                          ) -> None:
    doc = stub_config(tmp_path, stubs[0].port, stubs[1].port, workers=1, max_connections_per_worker=5)
    p = Proxy(write_config(tmp_path / "appliance.toml", doc), doc["server"]["port"]).start()
    held: list[socket.socket] = []
    try:
        for _ in range(5):
            s = connect(p.port)
            held.append(s)
            send(s, request("GET", "/livez"))
            assert read_response(s).status == 200  # accepted and served: the worker holds 5 connections
        r = exchange(p.port, request("GET", "/livez"))
        assert r.status == 503
        assert r.error()["code"] == "too_many_connections"
        assert "server.max_connections_per_worker" in r.error()["message"]
        assert r.headers["retry-after"]
        assert_closed(r)
        for s in held:  # the held connections are still served
            send(s, request("GET", "/livez"))
            assert read_response(s).status == 200
        held.pop().close()
        deadline = time.monotonic() + 5
        status = 0
        while status != 200 and time.monotonic() < deadline:
            status = exchange(p.port, request("GET", "/livez", headers={"Connection": "close"})).status
        assert status == 200
    finally:
        for s in held:
            s.close()
        p.stop()


# --- 3. orphaned workers -------------------------------------------------------------------------------------------


def test_workers_of_a_killed_arbiter_finish_their_streams_and_exit(stubs: tuple[StubLlama, StubLlama],
                                                                   tmp_path: Path) -> None:
    doc = stub_config(tmp_path, stubs[0].port, stubs[1].port)
    p = Proxy(write_config(tmp_path / "appliance.toml", doc), doc["server"]["port"]).start()
    assert p.proc is not None
    workers: list[int] = []
    received: list[bytes] = []

    def consume() -> None:
        body = json.dumps({"stub": "stream", "n": 12, "delay": 0.25}).encode()
        with httpx.stream("POST", p.url + "/v1/chat/completions", content=body, timeout=30) as r:
            received.extend(r.iter_raw())

    t = threading.Thread(target=consume)
    try:
        workers = workers_of(p, 2)
        t.start()
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert received, "the stream never started"
        p.proc.kill()
        p.proc.wait(5)
        # Within a second or two the port is free again for a restarted proxy, while the stream still runs.
        bound = False
        deadline = time.monotonic() + 2.5
        while not bound and time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", p.port))
                    probe.listen()
                    bound = True
                except OSError:
                    time.sleep(0.1)
        assert bound, "the orphaned workers still hold the listening socket"
        assert t.is_alive(), "the stream ended before the port was checked"
        t.join(20)
        assert b"".join(received).endswith(b"data: [DONE]\n\n")
        deadline = time.monotonic() + 15
        while any(rawhttp.alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(rawhttp.alive(w) for w in workers)
    finally:
        if t.ident is not None:
            t.join(20)
        for w in workers:
            if rawhttp.alive(w):
                os.kill(w, signal.SIGKILL)
        p.stop()


# --- 4, 5, 7. upgrades, malformed requests, early 413 --------------------------------------------------------------


def test_h2c_upgrade_is_declined_and_the_body_served(limited: Proxy, chat_stub: StubLlama) -> None:
    body = b'{"model":"chat-a","messages":[{"role":"user","content":"hi"}]}'
    with connect(limited.port) as s:
        for upgrade in ("h2c", "websocket"):
            send(s, request("POST", "/v1/chat/completions", body, headers={
                **AUTH, "Connection": "Upgrade, HTTP2-Settings", "Upgrade": upgrade,
                "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA", "Content-Type": "application/json"}))
            r = read_response(s)
            assert r.status == 200 and r.body == FIXED_RESPONSE
            assert chat_stub.received[-1].body == body
        # The connection is still an HTTP/1.1 one.
        send(s, request("POST", "/v1/chat/completions", body, headers=AUTH))
        assert read_response(s).status == 200
    r = exchange(limited.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert r.status == 405 and r.error()["code"] == "method_not_allowed"


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "HTTP/3.0"])
def test_unsupported_http_versions_get_505(limited: Proxy, version: str) -> None:
    r = exchange(limited.port, f"GET /livez {version}\r\nHost: x\r\n\r\n".encode())
    assert r.status == 505
    err = r.error()
    assert err["code"] == "http_version_not_supported" and "HTTP/1.1" in err["message"]
    assert_closed(r)
    assert "Traceback" not in limited.log.read_text()


MALFORMED = {
    "space in a header name": b"GET /livez HTTP/1.1\r\nHo st: x\r\n\r\n",
    "control character in a value": b"GET /livez HTTP/1.1\r\nHost: x\x01y\r\n\r\n",
    "folded header": b"GET /livez HTTP/1.1\r\nHost: x\r\n y\r\n\r\n",
    "bare LF": b"GET /livez HTTP/1.1\nHost: x\n\n",
    "invalid method": b"G@T /livez HTTP/1.1\r\nHost: x\r\n\r\n",
    "not HTTP": b"GET /livez FOO/1.1\r\nHost: x\r\n\r\n",
    "non-ASCII path": b"GET /liv\xc3\xa9z HTTP/1.1\r\nHost: x\r\n\r\n",
    "Content-Length and Transfer-Encoding": b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "invalid Content-Length": b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc",
    "two Content-Lengths": b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4"
                           b"\r\n\r\nabcd",
    "unknown Transfer-Encoding": b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "bad chunk size": b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
                      b"0\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_json_400(limited: Proxy, raw: bytes) -> None:
    r = exchange(limited.port, raw)
    assert r.status == 400
    err = r.error()
    assert err["code"] == "bad_request" and err["message"].startswith("malformed HTTP/1.1 request: ")
    assert_closed(r)


def test_http2_prior_knowledge_gets_505(limited: Proxy) -> None:
    r = exchange(limited.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert r.status == 505 and r.error()["code"] == "http_version_not_supported"
    assert_closed(r)


def test_malformed_chunk_mid_body_reaches_the_app_as_an_abort(limited: Proxy, chat_stub: StubLlama) -> None:
    with connect(limited.port) as s:
        send(s, request("POST", "/v1/chat/completions", headers={**AUTH, "Transfer-Encoding": "chunked",
                                                                 "X-Request-Id": "bad-chunk-1"}) + b'5\r\n{"mod\r\n')
        time.sleep(0.5)  # the app is now waiting for the rest of the body
        send(s, b"zz\r\n")
        data, closed = read_until_closed(s, 5)
    r = rawhttp.parse(data, closed)
    assert r.status == 400 and r.error()["code"] == "bad_request"
    assert_closed(r)
    assert not chat_stub.received
    assert event_of(limited, "bad-chunk-1")["status"] == 499
    assert "Traceback" not in limited.log.read_text()


@pytest.mark.parametrize("expect", [True, False])
def test_content_length_over_the_limit_gets_413_before_the_body(limited: Proxy, expect: bool) -> None:
    headers = {**AUTH, "Content-Length": str(BODY_LIMIT + 1)}
    if expect:
        headers["Expect"] = "100-continue"
    with connect(limited.port) as s:
        send(s, request("POST", "/v1/chat/completions", headers=headers))  # no body byte is sent
        data, closed = read_until_closed(s, 3)
    r = rawhttp.parse(data, closed)
    assert r.interim == [], "the client was invited to send a body that is refused"
    assert r.status == 413 and r.error()["code"] == "request_too_large"
    assert_closed(r)


def test_trailing_whitespace_is_not_part_of_a_header_value(limited: Proxy) -> None:
    raw = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + AUTH["Authorization"].split()[1]
           .encode() + b" \t\r\nX-Request-Id: trimmed-id  \r\n\r\n")
    with connect(limited.port) as s:
        send(s, raw)
        r = read_response(s)
    assert r.status == 200, r.body[:200]
    assert r.headers["x-request-id"] == "trimmed-id"


def test_the_http_layers_413_echoes_the_clients_request_id(limited: Proxy) -> None:
    # The id comes after Content-Length, and the answer still comes before any body byte is sent.
    headers = {**AUTH, "Content-Length": str(BODY_LIMIT + 1), "X-Request-Id": "client-id.413"}
    with connect(limited.port) as s:
        send(s, request("POST", "/v1/chat/completions", headers=headers))
        data, closed = read_until_closed(s, 3)
    r = rawhttp.parse(data, closed)
    assert r.status == 413 and r.headers["x-request-id"] == "client-id.413"
    bad = {**headers, "X-Request-Id": "not a valid id"}
    with connect(limited.port) as s:
        send(s, request("POST", "/v1/chat/completions", headers=bad))
        data, closed = read_until_closed(s, 3)
    r = rawhttp.parse(data, closed)
    assert r.status == 413 and r.headers["x-request-id"] != "not a valid id" and r.headers["x-request-id"]


def test_a_complete_request_followed_by_garbage_is_answered_then_the_garbage_gets_400(
        limited: Proxy, chat_stub: StubLlama) -> None:
    body = json.dumps({"model": "chat-a", "messages": []}).encode()
    first = request("POST", "/v1/chat/completions", body, {**AUTH, "X-Request-Id": "before-garbage"})
    with connect(limited.port) as s:
        send(s, first + request("GET", "/livez") + b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        data, closed = read_until_closed(s, 5)
    answers = []
    while data:
        r = rawhttp.parse(data, closed)
        answers.append(r)
        data = r.rest
    assert [r.status for r in answers] == [200, 200, 400], [(r.status, r.body[:100]) for r in answers]
    assert answers[0].headers["x-request-id"] == "before-garbage"
    assert answers[2].error()["code"] == "bad_request" and answers[2].closed
    assert chat_stub.received[-1].body == body


def test_pipelined_and_large_single_chunk_requests_still_work(limited: Proxy, chat_stub: StubLlama) -> None:
    body = json.dumps({"model": "chat-a", "pad": "y" * (BODY_LIMIT - 40)}).encode()
    big_head = head_of_size(MAX_HEAD - 200, "POST", "/v1/chat/completions")[:-2]
    # Head and body in one piece larger than max_header_bytes: only the head counts against it.
    first = big_head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    with connect(limited.port) as s:
        send(s, first + request("GET", "/v1/models", headers=AUTH) + request("GET", "/livez"))
        statuses = [r.status for r in read_responses(s, 3)]
    assert statuses == [200, 200, 200]
    assert chat_stub.received[-1].body == body

