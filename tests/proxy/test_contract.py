"""The public API's contract: docs/openapi.yaml against the real proxy, by schemathesis and by hand.

schemathesis generates requests from the spec (valid and invalid ones) for every operation and checks each answer's
status, content type, body and headers against what the spec documents for that operation. The statuses that
generated requests cannot reach (a broken or slow upstream, a full queue, a model not ready) are produced here by hand
and checked against the same spec.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from appliance.proxy.routes import ROUTES, UNEXPOSED
from tests.helpers import REPO, Proxy, stub_config, write_config
from tests.stub_llama import StubLlama

SPEC = REPO / "docs" / "openapi.yaml"
KEY = "sk-contract-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Operations the proxy answers itself, besides the forwarded ROUTES.
OWN_ROUTES = {"/v1/models": {"get", "head"}, "/models": {"get", "head"}, "/health": {"get", "head"},
              "/livez": {"get", "head"}, "/props": {"get", "head"},
              "/health/models/{name}": {"get", "head", "parameters"}}
# What schemathesis asserts on every response: never a 5xx, and status, content type, body and headers as documented.
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance", "unsupported_method", "ignored_auth")


@pytest.fixture(scope="module")
def contract_proxy(stubs: tuple[StubLlama, StubLlama], rerank_stub: StubLlama,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp: Path = tmp_path_factory.mktemp("contract")
    (tmp / "keys").write_text(f"contract: {KEY}\n")
    doc = stub_config(tmp, stubs[0].port, stubs[1].port, api_keys_file=str(tmp / "keys"), body_limit_bytes=65536,
                      request_timeout_s=2)
    doc["models"].append({"name": "rerank-a", "file": "a.gguf", "kind": "rerank", "port": rerank_stub.port,
                          "parallel": 1, "max_queue": 0})
    proxy = Proxy(write_config(tmp / "appliance.toml", doc), doc["server"]["port"]).start()
    yield proxy
    proxy.stop()


# The proxy's address is known only once its fixture runs, so the schema is loaded here without one and each case is
# sent to the proxy explicitly (schemathesis' lazy fixture loader does not run under this pytest).
schema = schemathesis.openapi.from_path(SPEC, config=schemathesis.Config.from_dict({
    "seed": 20261126,
    "request-timeout": 10,
    # Deterministic and bounded: the same requests on every run, no example database left behind.
    "generation": {"mode": "all", "max-examples": 25, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
               "stateful": {"enabled": False}},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
}))


# The HTTP layer's answers to malformed requests, documented for every path in the spec's description rather than
# per operation: they come before any route is chosen.
HTTP_LAYER = {400: "bad_request", 414: "uri_too_long", 431: "request_header_fields_too_large",
              505: "http_version_not_supported"}


@schema.parametrize()
def test_every_generated_request_gets_a_documented_answer(case: schemathesis.Case[Any], contract_proxy: Proxy) -> None:
    # The key passed here, not in the config, is what ignored_auth takes for valid and then leaves out or spoils.
    response = case.call(base_url=contract_proxy.url, headers=AUTH)
    if response.status_code in HTTP_LAYER and response.content and \
            response.json()["error"]["code"] == HTTP_LAYER[response.status_code]:
        # Generated headers can be malformed HTTP (a "Transfer-Encoding: ." on a GET, say).
        assert response.json() == {"error": {"message": ANY, "type": "invalid_request_error", "param": None,
                                             "code": ANY}}
        return
    case.validate_response(response, headers=AUTH, transport_kwargs={"base_url": contract_proxy.url, "headers": AUTH})


def _sent(proxy: Proxy, path: str, body: Any) -> schemathesis.Response:
    """POST ``body`` to the proxy and check the answer as schemathesis checks the generated ones; a 5xx is what these
    cases are for, so not_a_server_error is left out."""
    case = schema[path]["POST"].Case(body=body)
    return case.call_and_validate(base_url=proxy.url, headers=AUTH, excluded_checks=[not_a_server_error])


def _conforms(path: str, method: str, response: httpx.Response) -> None:
    """Check the answer to a request made by hand (raw bytes, no key) against what the spec documents for it."""
    schema[path][method].Case().validate_response(response, excluded_checks=[not_a_server_error])


def test_the_spec_has_exactly_the_served_routes() -> None:
    spec = schema.raw_schema
    assert {path: set(item) for path, item in spec["paths"].items()} == {**{r.path: {"post"} for r in ROUTES},
                                                                         **OWN_ROUTES}
    assert spec["x-not-exposed"] == UNEXPOSED


@pytest.mark.parametrize("path", sorted(UNEXPOSED))
def test_unexposed_routes_answer_the_documented_error(contract_proxy: Proxy, path: str) -> None:
    for method in ("GET", "POST"):
        r = httpx.request(method, contract_proxy.url + path.replace("{slot_id}", "0"), json={}, headers=AUTH)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert r.headers["x-request-id"]
        assert r.json() == {"error": {"message": ANY, "type": "invalid_request_error", "param": None,
                                      "code": "not_exposed"}}


@pytest.mark.parametrize(("path", "method"), [("/v1/chat/completions", "POST"), ("/v1/models", "GET"),
                                              ("/v1/models", "HEAD")])
def test_a_missing_or_wrong_key_is_401(contract_proxy: Proxy, path: str, method: str) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"}):
        r = httpx.request(method, contract_proxy.url + path, content=b"{}" if method == "POST" else None,
                          headers=headers)
        assert r.status_code == 401
        _conforms(path, method, r)


@pytest.mark.parametrize("path", ["/health", "/livez"])
def test_probes_need_no_key(contract_proxy: Proxy, path: str) -> None:
    for method in ("GET", "HEAD"):
        r = httpx.request(method, contract_proxy.url + path)
        assert r.status_code == 200
        _conforms(path, method, r)


@pytest.mark.parametrize("body", [b"", b"[1]", b'{"model": "chat-a",', b"\xff\xfe{}", b"[" * 40000])
def test_bodies_that_are_no_json_object_are_400(contract_proxy: Proxy, body: bytes) -> None:
    r = httpx.post(contract_proxy.url + "/v1/chat/completions", content=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    _conforms("/v1/chat/completions", "POST", r)


def test_a_model_of_the_wrong_kind_is_400(contract_proxy: Proxy) -> None:
    r = _sent(contract_proxy, "/v1/rerank", {"model": "chat-a", "query": "q", "documents": ["d"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"


def test_a_body_over_the_limit_is_413(contract_proxy: Proxy) -> None:
    r = httpx.post(contract_proxy.url + "/v1/embeddings", content=b'{"input": "' + b"x" * 70000 + b'"}',
                   headers=AUTH)
    assert r.status_code == 413
    _conforms("/v1/embeddings", "POST", r)


def test_a_full_queue_is_429_with_retry_after(contract_proxy: Proxy) -> None:
    """rerank-a admits one request (parallel 1, max_queue 0): the second, while the first stalls, is refused."""
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, contract_proxy.url + "/v1/rerank", json={"stub": "stall", "delay": 1},
                            headers=AUTH, timeout=10)
        time.sleep(0.3)
        r = _sent(contract_proxy, "/v1/rerank", {"query": "q", "documents": ["d"]})
        assert first.result().status_code == 200
    assert r.status_code == 429 and r.headers["retry-after"] == ["1"]


def test_an_unreachable_model_is_502(contract_proxy: Proxy) -> None:
    r = _sent(contract_proxy, "/v1/completions", {"stub": "reset"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"


def test_a_model_that_sends_no_headers_in_time_is_504(contract_proxy: Proxy) -> None:
    r = _sent(contract_proxy, "/v1/completions", {"stub": "stall", "delay": 2.5})
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"


def test_a_model_not_ready_is_503_with_retry_after(contract_proxy: Proxy, rerank_stub: StubLlama) -> None:
    rerank_stub.health_status = 503
    try:
        _wait_health(contract_proxy, 503)
        r = _sent(contract_proxy, "/rerank", {"query": "q", "documents": ["d"]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert r.headers["retry-after"][0].isdigit()
    finally:
        rerank_stub.health_status = 200
        _wait_health(contract_proxy, 200)


def _wait_health(proxy: Proxy, status: int) -> None:
    """Until /health (both workers: a fresh connection each time) answers ``status``, checked against the spec."""
    deadline = time.monotonic() + 10
    seen = 0
    while seen < 4:
        r = httpx.get(proxy.url + "/health")
        _conforms("/health", "GET", r)
        seen = seen + 1 if r.status_code == status else 0
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)


def test_a_stream_is_server_sent_events(contract_proxy: Proxy) -> None:
    r = _sent(contract_proxy, "/v1/chat/completions", {"stream": True, "stub": "stream", "n": 3})
    assert r.status_code == 200 and r.headers["content-type"] == ["text/event-stream"]
    assert r.content.count(b"data: ") == 4


def test_a_stream_that_breaks_ends_with_an_error_event(contract_proxy: Proxy) -> None:
    r = _sent(contract_proxy, "/v1/chat/completions", {"stream": True, "stub": "die"})
    assert r.status_code == 200
    last = r.content.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ")
    assert json.loads(last.removeprefix(b"data: ")) == {
        "error": {"message": ANY, "type": "server_error", "param": None, "code": "upstream_error"}}
