"""The error bodies the proxy writes itself (appliance/proxy/errors.py): OpenAI's shape, Anthropic's on its routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from appliance.proxy.errors import error_body, sse_error_event
from appliance.proxy.routes import ROUTES, is_anthropic
from tests.helpers import Proxy
from tests.stub_llama import StubLlama


def test_a_refused_key_is_an_authentication_error_as_llama_server_writes_it() -> None:
    # llama.cpp's own server tests check the type of a 401 (test_security.py::test_incorrect_api_key).
    assert json.loads(error_body(401, "missing or invalid API key", "invalid_api_key")) == {
        "error": {"message": "missing or invalid API key", "type": "authentication_error", "param": None,
                  "code": "invalid_api_key"}}


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (404, "invalid_request_error"),
                                              (429, "rate_limit_error"), (502, "server_error"), (503, "server_error")])
def test_other_statuses_keep_openais_types(status: int, kind: str) -> None:
    assert json.loads(error_body(status, "m", "c"))["error"]["type"] == kind


def test_anthropics_shape_keeps_the_appliances_code() -> None:
    assert json.loads(error_body(404, "model 'x' does not exist", "model_not_found", anthropic=True)) == {
        "type": "error", "error": {"type": "not_found_error", "message": "model 'x' does not exist",
                                   "code": "model_not_found"}}


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (529, "overloaded_error"),
    # Statuses Anthropic's API does not answer: the type of their class.
    (405, "invalid_request_error"), (499, "invalid_request_error"), (502, "api_error"), (503, "api_error"),
    (504, "api_error"),
])
def test_anthropics_types_by_status(status: int, kind: str) -> None:
    assert json.loads(error_body(status, "m", "c", anthropic=True))["error"]["type"] == kind


def test_the_sse_error_event_in_each_shape() -> None:
    openai_event = sse_error_event("broke", "upstream_error")
    assert openai_event.startswith(b"data: {") and openai_event.endswith(b"}\n\n")
    assert json.loads(openai_event.removeprefix(b"data: "))["error"]["code"] == "upstream_error"
    event = sse_error_event("broke", "upstream_error", anthropic=True)
    head, data = event.removesuffix(b"\n\n").split(b"\n")
    assert head == b"event: error" and data.startswith(b"data: ")
    assert json.loads(data.removeprefix(b"data: ")) == {
        "type": "error", "error": {"type": "api_error", "message": "broke", "code": "upstream_error"}}


def test_anthropics_routes_are_those_under_v1_messages() -> None:
    assert {r.path for r in ROUTES if is_anthropic(r.path)} == {"/v1/messages", "/v1/messages/count_tokens"}
    assert is_anthropic("/v1/messages/batches") and not is_anthropic("/v1/messagesx")


def _chunked(body: bytes) -> Iterator[bytes]:
    """``body`` sent chunked, without Content-Length: the HTTP layer cannot answer a size it does not know."""
    yield body


def _anthropic_error(r: httpx.Response) -> dict[str, Any]:
    doc = r.json()
    assert set(doc) == {"type", "error"} and doc["type"] == "error"
    err: dict[str, Any] = doc["error"]
    assert set(err) == {"type", "message", "code"} and err["message"]
    return err


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_anthropics_routes_answer_in_anthropics_shape(proxy: Proxy, path: str) -> None:
    r = httpx.post(proxy.url + path, content=b'{"model": "nope"}')
    assert r.status_code == 404
    assert _anthropic_error(r) | {"message": ""} == {"type": "not_found_error", "message": "",
                                                     "code": "model_not_found"}
    r = httpx.post(proxy.url + path, content=b"{not json")
    assert r.status_code == 400
    assert _anthropic_error(r)["type"] == "invalid_request_error" and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(proxy.url + path, content=_chunked(b"x" * 5000))  # over the limit, found while read
    assert r.status_code == 413 and _anthropic_error(r)["type"] == "request_too_large"
    r = httpx.post(proxy.url + path, content=b"x" * 5000)  # over the limit, declared: the HTTP layer answers
    assert r.status_code == 413 and _anthropic_error(r)["type"] == "request_too_large"


def test_falcons_own_404_and_405_under_v1_messages_are_anthropic_shaped(proxy: Proxy) -> None:
    r = httpx.post(proxy.url + "/v1/messages/batches", json={})
    assert r.status_code == 404
    assert _anthropic_error(r) | {"message": ""} == {"type": "not_found_error", "message": "", "code": "not_found"}
    r = httpx.get(proxy.url + "/v1/messages")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert _anthropic_error(r)["type"] == "invalid_request_error" and r.json()["error"]["code"] == "method_not_allowed"


def test_openais_routes_keep_openais_shape(proxy: Proxy) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", content=b'{"model": "nope"}')
    assert r.status_code == 404 and set(r.json()) == {"error"}
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] is None


def test_a_stream_broken_on_v1_messages_ends_with_anthropics_error_event(proxy: Proxy, chat_stub: StubLlama
                                                                        ) -> None:
    with httpx.stream("POST", proxy.url + "/v1/messages", content=b'{"stub":"die"}', timeout=5) as r:
        data = b"".join(r.iter_raw())
    last = [e for e in data.split(b"\n\n") if e][-1]
    assert last.startswith(b"event: error\ndata: ")
    assert json.loads(last.partition(b"data: ")[2])["error"] | {"message": ""} == {
        "type": "api_error", "message": "", "code": "upstream_error"}


def test_anthropics_sdk_reads_the_errors(proxy: Proxy, chat_stub: StubLlama) -> None:
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.type == "not_found_error" and caught.value.api_message
    assert isinstance(caught.value.body, dict) and caught.value.body["error"]["code"] == "model_not_found"
    # A broken stream: the SDK raises the error event (the stub's OpenAI-shaped events before it are skipped).
    with pytest.raises(anthropic.APIStatusError) as broken:
        for _ in client.messages.create(model="chat-a", max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
                                        stream=True, extra_body={"stub": "die"}):
            pass
    assert broken.value.type == "api_error"
    assert isinstance(broken.value.body, dict) and broken.value.body["error"]["code"] == "upstream_error"
