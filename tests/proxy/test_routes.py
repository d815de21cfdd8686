"""Every served route, the ones deliberately not served, named keys, CORS and the host-wide queue bound, on stubs."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from appliance.proxy.routes import ROUTES, UNEXPOSED
from tests.events.test_events import wait_events
from tests.helpers import REPO, Exporter, Proxy, samples, stub_config, value, write_config
from tests.stub_llama import StubLlama

KEY = "sk-alice-1"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def api(stubs: tuple[StubLlama, StubLlama], rerank_stub: StubLlama, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[Proxy, Exporter]]:
    tmp: Path = tmp_path_factory.mktemp("routes")
    (tmp / "keys").write_text(f"alice: {KEY}\nsk-bare-key\n")
    doc = stub_config(tmp, stubs[0].port, stubs[1].port, api_keys_file=str(tmp / "keys"),
                      cors_allow_origins=[ORIGIN], request_timeout_s=10)
    doc["models"][0].update(parallel=1, max_queue=1, aliases=["gpt-4o-mini", "llama-*"])
    doc["models"][1]["aliases"] = ["text-embedding-*", "gpt-*"]
    doc["models"].append({"name": "rerank-a", "file": "a.gguf", "kind": "rerank", "port": rerank_stub.port})
    config = write_config(tmp / "appliance.toml", doc)
    proxy = Proxy(config, doc["server"]["port"]).start()
    exporter = Exporter(config, doc["metrics"]["port"]).start()
    yield proxy, exporter
    exporter.stop()
    proxy.stop()


def _stub_for(route_kinds: tuple[str, ...], stubs: tuple[StubLlama, StubLlama], rerank: StubLlama) -> StubLlama:
    return {"chat": stubs[0], "embed": stubs[1], "rerank": rerank}[route_kinds[0]]


@pytest.mark.parametrize("route", ROUTES, ids=[r.path for r in ROUTES])
def test_every_route_reaches_the_same_path_on_its_default_model(
        api: tuple[Proxy, Exporter], stubs: tuple[StubLlama, StubLlama], rerank_stub: StubLlama, route: Any) -> None:
    stub = _stub_for(route.kinds, stubs, rerank_stub)
    stub.received.clear()
    body = b'{"input":"x",  "extra": [1, 2.50]}'
    r = httpx.post(api[0].url + route.path, content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert [(x.path, x.body) for x in stub.received] == [(route.path, body)]


def test_get_props_reads_the_chosen_models_settings_and_post_reaches_nothing(
        api: tuple[Proxy, Exporter], stubs: tuple[StubLlama, StubLlama]) -> None:
    chat, embed = stubs
    chat.received.clear()
    embed.received.clear()
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(api[0].url + "/props", headers=auth)
    assert r.status_code == 200 and r.json()["stub_port"] == chat.port  # the default chat model
    assert [(x.path, x.body) for x in chat.received] == [("/props", b"")]
    r = httpx.get(api[0].url + "/props", params={"model": "text-embedding-3-small"}, headers=auth)
    assert r.status_code == 200 and r.json()["stub_port"] == embed.port  # by alias pattern
    r = httpx.get(api[0].url + "/props", params={"model": "nope"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    chat.received.clear()
    r = httpx.post(api[0].url + "/props", json={"n_ctx": 1}, headers=auth)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "changes a model's settings" in r.json()["error"]["message"] and r.headers["allow"] == "GET, HEAD"
    assert chat.received == []
    assert httpx.get(api[0].url + "/props").status_code == 401  # a key is needed, as on every API route


def test_alias_patterns_route_hard_coded_names_and_exact_names_win(
        api: tuple[Proxy, Exporter], stubs: tuple[StubLlama, StubLlama]) -> None:
    chat, embed = stubs
    auth = {"Authorization": f"Bearer {KEY}"}
    for name, stub in (("gpt-4o-mini", chat), ("llama-3.1-8b-instruct", chat), ("gpt-3.5-turbo", embed),
                       ("text-embedding-3-small", embed), ("chat-a", chat)):
        chat.received.clear()
        embed.received.clear()
        r = httpx.post(api[0].url + "/tokenize", json={"model": name, "content": "x"}, headers=auth)
        assert r.status_code == 200, (name, r.text)
        assert len(stub.received) == 1, name
    r = httpx.post(api[0].url + "/v1/chat/completions", json={"model": "mistral-7b"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    listed = {m["id"]: m["aliases"] for m in httpx.get(api[0].url + "/v1/models", headers=auth).json()["data"]}
    assert listed["embed-a"] == ["text-embedding-*", "gpt-*"]


def test_a_route_refuses_a_model_of_the_wrong_kind(api: tuple[Proxy, Exporter]) -> None:
    r = httpx.post(api[0].url + "/v1/rerank", json={"model": "chat-a", "query": "q", "documents": ["d"]},
                   headers={"x-api-key": KEY})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "wrong_model_kind" and "rerank" in r.json()["error"]["message"]
    r = httpx.post(api[0].url + "/tokenize", json={"model": "embed-a", "content": "x"}, headers={"x-api-key": KEY})
    assert r.status_code == 200  # any kind tokenizes


@pytest.mark.parametrize("path", sorted(UNEXPOSED))
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unexposed_routes_are_404_and_reach_nothing(api: tuple[Proxy, Exporter], stubs: tuple[StubLlama, StubLlama],
                                                   path: str, method: str) -> None:
    stubs[0].received.clear()
    url = api[0].url + path.replace("{slot_id}", "0") + "?action=save"
    r = httpx.request(method, url, json={"model": "chat-a"}, headers={"x-api-key": KEY})
    assert r.status_code in (404, 405), r.text
    assert r.headers["content-type"].startswith("application/json")
    if r.status_code == 404:
        assert r.json()["error"]["code"] == "not_exposed"
    assert stubs[0].received == []


def test_x_api_key_is_a_key_and_neither_key_header_is_forwarded(api: tuple[Proxy, Exporter],
                                                                chat_stub: StubLlama) -> None:
    for headers in ({"x-api-key": KEY, "anthropic-version": "2023-06-01"}, {"Authorization": "Bearer sk-bare-key"}):
        r = httpx.post(api[0].url + "/v1/messages", content=b"{}", headers=headers)
        assert r.status_code == 200
        sent = {k.lower() for k in chat_stub.received[-1].headers}
        assert not sent & {"authorization", "x-api-key", "anthropic-version"}
    wrong = ({"x-api-key": "sk-wrong"}, {"x-api-key": ""}, {"Authorization": "Bearer sk-wrong", "x-api-key": KEY})
    for headers in wrong:
        r = httpx.post(api[0].url + "/v1/messages", content=b"{}", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_only_the_headers_the_client_sent_go_upstream(api: tuple[Proxy, Exporter], chat_stub: StubLlama) -> None:
    with socket.create_connection(("127.0.0.1", api[0].port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    sent = {k.lower() for k in chat_stub.received[-1].headers}
    assert sent <= {"host", "content-length", "x-request-id"}, sent


def test_named_keys_label_metrics_and_events(api: tuple[Proxy, Exporter], chat_stub: StubLlama) -> None:
    proxy, exporter = api
    rid = f"named-{time.monotonic_ns()}"
    assert httpx.post(proxy.url + "/v1/chat/completions", content=b"{}",
                      headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": rid}).status_code == 200
    assert httpx.post(proxy.url + "/v1/chat/completions", content=b"{}",
                      headers={"Authorization": "Bearer nope"}).status_code == 401
    events = wait_events(proxy.config_path.parent / "run" / "events.jsonl", lambda e: e.get("request_id") == rid)
    assert events[-1]["client"] == "alice"
    parsed = samples(httpx.get(exporter.url + "/metrics").text)
    assert value(parsed, "appliance_requests_total", route="/v1/chat/completions", client="alice") >= 1
    assert value(parsed, "appliance_requests_total", status="401", client="unauthenticated") >= 1
    bare = [ls for (n, ls) in parsed if n == "appliance_requests_total" and ("client", "sk-bare-key") in ls]
    assert bare == []  # keys never appear, only their names


def test_anthropic_sdk_authenticates_with_x_api_key(api: tuple[Proxy, Exporter], chat_stub: StubLlama) -> None:
    client = anthropic.Anthropic(base_url=api[0].url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=api[0].url, api_key="sk-wrong", max_retries=0).messages.create(
            model="chat-a", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert chat_stub.received == [] or chat_stub.received[-1].path != "/v1/messages"


class TestCors:
    def _preflight(self, url: str, origin: str) -> httpx.Response:
        return httpx.options(url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})

    def test_preflight_of_a_listed_origin_needs_no_key(self, api: tuple[Proxy, Exporter]) -> None:
        r = self._preflight(api[0].url, ORIGIN)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "authorization, content-type"

    def test_unlisted_origin_gets_no_cors_header(self, api: tuple[Proxy, Exporter]) -> None:
        r = self._preflight(api[0].url, "https://evil.example")
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        r = httpx.post(api[0].url + "/v1/chat/completions", content=b"{}",
                       headers={"Origin": "https://evil.example", "x-api-key": KEY})
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]

    def test_responses_and_errors_carry_the_origin(self, api: tuple[Proxy, Exporter]) -> None:
        ok = httpx.post(api[0].url + "/v1/chat/completions", content=b"{}",
                        headers={"Origin": ORIGIN, "x-api-key": KEY})
        denied = httpx.post(api[0].url + "/v1/chat/completions", content=b"{}", headers={"Origin": ORIGIN})
        for r, status in ((ok, 200), (denied, 401)):
            assert r.status_code == status
            assert r.headers["access-control-allow-origin"] == ORIGIN
            assert "X-Request-Id" in r.headers["access-control-expose-headers"]

    def test_without_origins_configured_there_is_no_cors_at_all(self, proxy: Proxy) -> None:
        r = self._preflight(proxy.url, ORIGIN)
        assert r.status_code == 200 and "POST" in r.headers["allow"]  # Falcon's plain OPTIONS answer
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]


@pytest.mark.parametrize("path", ["/health", "/livez", "/v1/models", "/models"])
def test_head_on_get_routes(api: tuple[Proxy, Exporter], path: str) -> None:
    get = httpx.get(api[0].url + path, headers={"x-api-key": KEY})
    head = httpx.head(api[0].url + path, headers={"x-api-key": KEY})
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_a_body_shorter_than_its_length_is_never_forwarded(api: tuple[Proxy, Exporter], chat_stub: StubLlama) -> None:
    proxy, exporter = api
    rid = f"short-{time.monotonic_ns()}"
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nX-Request-Id: {rid}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode() + b'{"messages": [')
        time.sleep(0.3)
    events = wait_events(proxy.config_path.parent / "run" / "events.jsonl", lambda e: e.get("request_id") == rid)
    assert events[-1]["status"] == 499
    assert chat_stub.received == []
    parsed = samples(httpx.get(exporter.url + "/metrics").text)
    assert value(parsed, "appliance_requests_total", route="/v1/chat/completions", status="499") >= 1


@pytest.mark.parametrize(("body", "hint"), [
    (b"[" * 40000 + b"]" * 40000, "nested too deeply"),
    (b'{"model": "chat-a", "seed": ' + b"7" * 5000 + b"}", "a number too large"),
    (b'{"model": "chat-a",', "not valid JSON"),
])
def test_bodies_python_cannot_read_are_400_with_a_plain_reason(api: tuple[Proxy, Exporter], chat_stub: StubLlama,
                                                               body: bytes, hint: str) -> None:
    r = httpx.post(api[0].url + "/v1/chat/completions", content=body, headers={"x-api-key": KEY})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert hint in message and "sys." not in message and "set_int_max_str_digits" not in message
    assert chat_stub.received == []


def test_502_names_the_model_and_the_failure_not_the_address(api: tuple[Proxy, Exporter], tmp_path: Path,
                                                             stubs: tuple[StubLlama, StubLlama]) -> None:
    r = httpx.post(api[0].url + "/v1/chat/completions", json={"stub": "reset"}, headers={"x-api-key": KEY})
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert "chat-a" in message and "127.0.0.1" not in message and str(stubs[0].port) not in message


def test_a_connection_the_server_dropped_while_idle_is_retried_on_a_fresh_one(
        api: tuple[Proxy, Exporter], chat_stub: StubLlama) -> None:
    with httpx.Client(base_url=api[0].url, headers={"x-api-key": KEY}) as client:
        for _ in range(5):
            assert client.post("/v1/completions", json={"stub": "doom"}).status_code == 200
            # Same client connection, so the same worker; the request gets the pooled upstream connection (the
            # readiness poll uses connections of its own), which the stub drops unanswered, and the proxy sends it
            # again on a fresh connection.
            r = client.post("/v1/completions", content=b'{"n": 1}')
            assert r.status_code == 200, r.text
    # Every copy was dropped and sent again, and nothing else was sent twice.
    assert chat_stub.dropped == 5
    assert sum(1 for x in chat_stub.received if x.body == b'{"n": 1}') == 10


def test_the_queue_bound_counts_across_workers(api: tuple[Proxy, Exporter], chat_stub: StubLlama) -> None:
    """chat-a: parallel 1 + max_queue 1. Requests are spread over two workers; counted per worker, more than two
    would be admitted."""
    proxy, exporter = api
    statuses: list[int] = []
    retry_after: list[str] = []

    def call() -> None:
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"stub": "stall", "delay": 2},
                       headers={"x-api-key": KEY}, timeout=15)
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry_after.append(r.headers.get("retry-after", ""))
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert r.json()["error"]["type"] == "rate_limit_error"

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # one at a time, so that no two workers admit at the same instant
    for t in threads:
        t.join(20)
    assert sorted(statuses) == [200, 200] + [429] * 6
    assert set(retry_after) == {"1"}
    parsed = samples(httpx.get(exporter.url + "/metrics").text)
    assert value(parsed, "appliance_queue_full_total", model="chat-a") >= 6
    assert value(parsed, "appliance_in_flight", model="chat-a") == 0
    # Once they are done the bound is free again.
    assert httpx.post(proxy.url + "/v1/chat/completions", content=b"{}", headers={"x-api-key": KEY}).status_code == 200


def test_models_list_answers_without_v1_prefix(api: tuple[Proxy, Exporter]) -> None:
    ids = [m["id"] for m in httpx.get(api[0].url + "/models", headers={"x-api-key": KEY}).json()["data"]]
    assert ids == ["chat-a", "embed-a", "rerank-a"]
    assert json.loads(httpx.get(api[0].url + "/v1/models", headers={"x-api-key": KEY}).content)["data"][2]["kind"] == \
        "rerank"


def test_the_readme_lists_every_route_and_every_refusal() -> None:
    readme = (REPO / "docs/api.md").read_text()
    api = readme[readme.index("# The API"):readme.index("## Errors")]
    for route in ROUTES:
        assert f"| `POST {route.path}` | {' or '.join(route.kinds)} |" in api, route.path
    for path in UNEXPOSED:
        assert f"| `{path}` |" in api, path


def test_refusals_below_the_app_are_counted(api: tuple[Proxy, Exporter]) -> None:
    proxy, exporter = api
    r = httpx.get(proxy.url + "/v1/models?q=" + "x" * 9000, headers={"x-api-key": KEY})
    assert r.status_code == 414 and r.json()["error"]["code"] == "uri_too_long"
    parsed = samples(httpx.get(exporter.url + "/metrics").text)
    assert value(parsed, "appliance_http_refused_total", status="414") >= 1


def test_no_server_header_names_the_software(api: tuple[Proxy, Exporter]) -> None:
    for r in (httpx.get(api[0].url + "/livez"), httpx.get(api[0].url + "/x" * 5000)):
        assert "server" not in r.headers, r.headers
