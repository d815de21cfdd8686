"""The proxy under real gunicorn + uvicorn workers, in front of stub llama-servers (SPEC §2)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.helpers import Proxy
from tests.stub_llama import FIXED_RESPONSE, StubLlama


def error_of(r: httpx.Response) -> dict[str, object]:
    doc = r.json()
    assert set(doc) == {"error"}
    err: dict[str, object] = doc["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and isinstance(err["code"], str)
    return err


def test_request_and_response_bodies_pass_byte_for_byte(proxy: Proxy, chat_stub: StubLlama) -> None:
    # Odd spacing, key order, unicode escapes and fields the proxy does not know must all survive untouched.
    body = (b'{ "model" :"chat-a","messages":[{"role":"user","content":"h\\u00e9"}],"slot_id": 1,'
            b'"seed":42,"temperature":0.0,"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],'
            b'"response_format":{"type":"json_object"}}')
    r = httpx.post(proxy.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert r.content == FIXED_RESPONSE
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert chat_stub.received[-1].body == body
    assert chat_stub.received[-1].path == "/v1/chat/completions"


def test_alias_and_default_model_route_to_the_chat_child(proxy: Proxy, chat_stub: StubLlama) -> None:
    for body in (b'{"model":"gpt-4o-mini"}', b'{"prompt":"x"}'):
        r = httpx.post(proxy.url + "/v1/completions", content=body)
        assert r.status_code == 200
        assert chat_stub.received[-1].body == body
        assert chat_stub.received[-1].path == "/v1/completions"


def test_embeddings_go_to_the_embed_child(proxy: Proxy, stubs: tuple[StubLlama, StubLlama]) -> None:
    stubs[1].received.clear()
    r = httpx.post(proxy.url + "/v1/embeddings", content=b'{"input":"hi"}')
    assert r.status_code == 200
    assert [x.path for x in stubs[1].received] == ["/v1/embeddings"]


def test_only_safe_headers_go_upstream(proxy: Proxy, chat_stub: StubLlama) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", content=b"{}",
                   headers={"Authorization": "Bearer secret", "Cookie": "a=b", "X-Request-Id": "abc-123",
                            "Content-Type": "application/json", "X-Forwarded-For": "1.2.3.4"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"
    sent = {k.lower(): v for k, v in chat_stub.received[-1].headers.items()}
    assert "authorization" not in sent and "cookie" not in sent and "x-forwarded-for" not in sent
    assert sent["x-request-id"] == "abc-123"
    assert sent["content-type"] == "application/json"


def test_request_id_generated_when_absent_or_invalid(proxy: Proxy) -> None:
    for headers in ({}, {"X-Request-Id": "bad id <script>"}):
        r = httpx.get(proxy.url + "/v1/models", headers=headers)
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and rid != headers.get("X-Request-Id")
    assert httpx.get(proxy.url + "/nope").headers["x-request-id"]


def test_models_lists_configured_models(proxy: Proxy) -> None:
    doc = httpx.get(proxy.url + "/v1/models").json()
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["chat-a", "embed-a"]
    assert all(m["object"] == "model" for m in doc["data"])


def test_stream_arrives_event_by_event(proxy: Proxy, chat_stub: StubLlama) -> None:
    body = json.dumps({"stub": "stream", "n": 4, "delay": 0.4}).encode()
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", content=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        it = r.iter_raw()
        first = next(it)
        # The stub needs 1.2 s more to send the rest: the first event must not wait for them.
        assert first.startswith(b"data: ")
        assert chat_stub.received[-1].events_sent < 4
        rest = b"".join(it)
    assert rest.endswith(b"data: [DONE]\n\n")
    assert (first + rest).count(b"data: ") == 5


def test_client_disconnect_mid_stream_closes_upstream(proxy: Proxy, chat_stub: StubLlama) -> None:
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", content=b'{"stub":"forever"}') as r:
        next(r.iter_raw())
    gone = time.monotonic()
    _wait_closed(chat_stub, gone)


def test_client_disconnect_before_first_byte_closes_upstream(proxy: Proxy, chat_stub: StubLlama) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        body = b'{"stub":"stall","delay":1.2}'
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 5
        while not chat_stub.received and time.monotonic() < deadline:
            time.sleep(0.02)
    _wait_closed(chat_stub, time.monotonic())


def _wait_closed(stub: StubLlama, since: float) -> None:
    deadline = since + 1.0
    while time.monotonic() < deadline and stub.received[-1].closed_early_at is None:
        time.sleep(0.02)
    closed = stub.received[-1].closed_early_at
    assert closed is not None, "the stub still has an open upstream connection a second after the client left"
    assert closed - since < 1.0


def test_child_dying_mid_stream_ends_with_an_sse_error_event(proxy: Proxy, chat_stub: StubLlama) -> None:
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", content=b'{"stub":"die"}', timeout=5) as r:
        data = b"".join(r.iter_raw())
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 3
    err = json.loads(events[-1].removeprefix(b"data: "))["error"]
    assert err["code"] == "upstream_error"


def test_body_limit_is_inclusive(proxy: Proxy, chat_stub: StubLlama) -> None:
    limit = 4096
    head = b'{"model":"chat-a","pad":"'
    at_limit = head + b"x" * (limit - len(head) - 2) + b'"}'
    assert len(at_limit) == limit
    assert httpx.post(proxy.url + "/v1/chat/completions", content=at_limit).status_code == 200
    assert chat_stub.received[-1].body == at_limit
    over = head + b"x" * (limit - len(head) - 1) + b'"}'
    r = httpx.post(proxy.url + "/v1/chat/completions", content=over)
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"


def test_body_limit_applies_to_chunked_bodies_without_length(proxy: Proxy) -> None:
    def gen() -> object:
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(proxy.url + "/v1/chat/completions", content=gen())  # type: ignore[arg-type]
    assert r.status_code == 413


def test_slow_response_headers_give_504(proxy: Proxy, chat_stub: StubLlama) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", content=b'{"stub":"stall","delay":5}', timeout=10)
    assert r.status_code == 504
    assert error_of(r)["code"] == "upstream_timeout"


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"model": 7}', 400, "invalid_model"),
    (b'{"model": "nope"}', 404, "model_not_found"),
    (b'{"model": "embed-a"}', 400, "wrong_model_kind"),
])
def test_bad_requests_get_openai_errors(proxy: Proxy, body: bytes, status: int, code: str) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", content=body)
    assert r.status_code == status
    assert error_of(r)["code"] == code


def test_unknown_path_and_wrong_method(proxy: Proxy) -> None:
    r = httpx.get(proxy.url + "/v2/anything")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = httpx.delete(proxy.url + "/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


def test_model_not_ready_gives_503_with_retry_after(proxy: Proxy, chat_stub: StubLlama) -> None:
    chat_stub.health_status = 503
    try:
        deadline = time.monotonic() + 5
        r = httpx.post(proxy.url + "/v1/chat/completions", content=b"{}")
        while time.monotonic() < deadline:  # both workers poll once a second
            r = httpx.post(proxy.url + "/v1/chat/completions", content=b"{}")
            h = httpx.get(proxy.url + "/health")
            if r.status_code == 503 and h.status_code == 503:
                time.sleep(1.2)
                r = httpx.post(proxy.url + "/v1/chat/completions", content=b"{}")
                break
            time.sleep(0.2)
        assert r.status_code == 503
        assert r.headers["retry-after"]
        assert error_of(r)["code"] == "model_not_ready"
        doc = httpx.get(proxy.url + "/health").json()
        assert doc["status"] == "starting" and doc["warm_up_state"] == "loading"
        assert doc["models"]["chat-a"]["state"] == "restarting"  # it was ready before
        assert doc["models"]["embed-a"]["state"] == "ready"
        # Per model, for a load balancer: only chat-a's requests go elsewhere; the host keeps embed-a's.
        chat = httpx.get(proxy.url + "/health/models/gpt-4o-mini")  # an alias names the same model
        assert chat.status_code == 503
        assert chat.json() == {**chat.json(), "model": "chat-a", "serving": False, "state": "restarting"}
        assert httpx.get(proxy.url + "/health/models/embed-a").status_code == 200
    finally:
        chat_stub.health_status = 200
    # Every worker must have seen the model come back (each polls on its own, and a busy machine delays that): ten
    # answers in a row, over new connections that land on any worker, all say ok.
    deadline = time.monotonic() + 15
    in_a_row = 0
    while in_a_row < 10 and time.monotonic() < deadline:
        in_a_row = in_a_row + 1 if httpx.get(proxy.url + "/health").status_code == 200 else 0
        time.sleep(0.1)
    assert in_a_row == 10


def test_model_health_per_model(proxy: Proxy) -> None:
    r = httpx.get(proxy.url + "/health/models/chat-a")
    assert r.status_code == 200
    assert r.json() == {**r.json(), "model": "chat-a", "load": "always", "serving": True, "draining": False,
                        "state": "ready"}
    head = httpx.head(proxy.url + "/health/models/chat-a")
    assert head.status_code == 200 and head.content == b""
    unknown = httpx.get(proxy.url + "/health/models/no-such-model")
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"


def test_model_list_adds_the_fleet_models_the_load_balancer_names(proxy: Proxy) -> None:
    fleet = [{"id": "chat-a", "kind": "chat", "aliases": []},  # served here: listed once, with its state
             {"id": "chat-b", "kind": "chat", "aliases": ["gpt-*"]},
             {"id": "embed-z", "kind": "embed"}]
    doc = httpx.get(proxy.url + "/v1/models", headers={"X-Appliance-Fleet-Models": json.dumps(fleet)}).json()
    by_id = {m["id"]: m for m in doc["data"]}
    assert [m["id"] for m in doc["data"]] == ["chat-a", "embed-a", "chat-b", "embed-z"]
    assert by_id["chat-a"]["state"] == "ready"
    assert by_id["chat-b"] == {**by_id["chat-b"], "kind": "chat", "aliases": ["gpt-*"], "object": "model"}
    assert "state" not in by_id["chat-b"] and "load" not in by_id["embed-z"]
    # Anything malformed is ignored, never an error.
    for bad in ("not json", "{}", '[{"id": 3}, {"id": "x", "aliases": [1]}, "y"]'):
        r = httpx.get(proxy.url + "/v1/models", headers={"X-Appliance-Fleet-Models": bad})
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["chat-a", "embed-a"]


def test_health_shape_and_livez(proxy: Proxy) -> None:
    r = httpx.get(proxy.url + "/health")
    assert r.status_code == 200
    doc = r.json()
    assert doc["status"] == "ok" and doc["warm_up_state"] == "ready" and doc["backend"] == "llama-server"
    assert doc["model"] == "chat-a"
    assert set(doc["models"]) == {"chat-a", "embed-a"}
    assert set(doc["models"]["chat-a"]) == {"state", "since", "restarts"}
    assert isinstance(doc["version"], str)
    assert httpx.get(proxy.url + "/livez").status_code == 200
