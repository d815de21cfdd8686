"""The whole client-facing API on the real llama-server and model, through the official clients where one exists."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL_FILE, Appliance, chat_model, serving
from tests.helpers import free_port

KEY = "sk-e2e-api"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "keys").write_text(f"e2e: {KEY}\n")
    models = [{**chat_model(free_port()), "chat_template": "gemma", "aliases": ["gpt-*", "claude-*"]},
              {"name": "gemma-3-270m-rerank", "file": MODEL_FILE, "kind": "rerank", "port": free_port(),
               "ctx_size": 1024, "threads": 1, "parallel": 1}]
    with serving(tmp, models, {"server": {"api_keys_file": str(tmp / "keys")}}) as app:
        yield app


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_responses_api_with_the_openai_sdk(api: Appliance) -> None:
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0)
    out = client.responses.create(model="gemma-3-270m", input="Paris is the capital of", max_output_tokens=8)
    assert out.model == "gemma-3-270m"
    assert out.output_text
    events = list(client.responses.create(model="gemma-3-270m", input="Hello", max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    r = httpx.post(api.url + "/v1/responses/input_tokens", headers=_headers(),
                   json={"model": "gemma-3-270m", "input": "Hello there"})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_anthropic_messages_with_the_anthropic_sdk(api: Appliance) -> None:
    client = anthropic.Anthropic(base_url=api.url, api_key=KEY, max_retries=0)  # sends x-api-key
    msg = client.messages.create(model="gemma-3-270m", max_tokens=8,
                                 messages=[{"role": "user", "content": "Paris is the capital of"}])
    assert msg.model == "gemma-3-270m" and msg.role == "assistant"
    assert msg.content and msg.content[0].type == "text"
    with client.messages.stream(model="gemma-3-270m", max_tokens=8,
                                messages=[{"role": "user", "content": "Hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0 and isinstance(text, str)
    count = client.messages.count_tokens(model="gemma-3-270m", messages=[{"role": "user", "content": "Hello there"}])
    assert count.input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=api.url, api_key="wrong", max_retries=0).messages.create(
            model="gemma-3-270m", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])


def test_anthropic_errors_in_anthropics_shape_with_the_anthropic_sdk(api: Appliance) -> None:
    client = anthropic.Anthropic(base_url=api.url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    err = caught.value
    assert err.type == "not_found_error" and err.api_message and "no-such-model" in err.api_message
    assert err.body == err.response.json() == {"type": "error", "error": {
        "type": "not_found_error", "message": err.api_message, "code": "model_not_found"}}
    # The OpenAI routes keep OpenAI's shape.
    r = httpx.post(api.url + "/v1/chat/completions", headers=_headers(), json={"model": "no-such-model"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_native_routes(api: Appliance) -> None:
    tok = httpx.post(api.url + "/tokenize", headers=_headers(), json={"content": "Hello world"})
    assert tok.status_code == 200
    tokens = tok.json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    detok = httpx.post(api.url + "/detokenize", headers=_headers(), json={"tokens": tokens})
    assert detok.json()["content"].strip() == "Hello world"
    tpl = httpx.post(api.url + "/apply-template", headers=_headers(),
                     json={"messages": [{"role": "user", "content": "Hi"}]})
    assert "<start_of_turn>user\nHi<end_of_turn>" in tpl.json()["prompt"]  # chat_template = "gemma"
    infill = httpx.post(api.url + "/infill", headers=_headers(), timeout=60,
                        json={"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n", "n_predict": 4})
    # Gemma 3 has no fill-in-the-middle tokens: llama-server's own answer comes back verbatim, as it would directly.
    assert infill.status_code == 501, infill.text
    assert "Infill is not supported by this model" in infill.json()["error"]["message"]


def test_llama_servers_last_native_routes_and_hard_coded_client_names(api: Appliance) -> None:
    # POST /completion: llama-server's native completion, as llama.cpp's own tools call it.
    r = httpx.post(api.url + "/completion", headers=_headers(), timeout=60,
                   json={"prompt": "Paris is the capital of", "n_predict": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "France" in r.json()["content"] and r.json()["tokens_predicted"] > 0
    count = httpx.post(api.url + "/v1/chat/completions/input_tokens", headers=_headers(), timeout=60,
                       json={"messages": [{"role": "user", "content": "Hello there"}]})
    assert count.status_code == 200, count.text
    assert count.json()["input_tokens"] > 0
    # GET /props, read-only, for the default model or the one ?model= names; POST stays refused.
    props = httpx.get(api.url + "/props", headers=_headers(), timeout=30)
    assert props.status_code == 200, props.text
    assert props.json()["default_generation_settings"]["n_ctx"] > 0 and "chat_template" in props.json()
    rerank = httpx.get(api.url + "/props", params={"model": "gemma-3-270m-rerank"}, headers=_headers(), timeout=30)
    assert rerank.status_code == 200 and rerank.json()["model_alias"] == "gemma-3-270m-rerank"
    missing = httpx.get(api.url + "/props", params={"model": "nope"}, headers=_headers())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    # A name a client hard-codes reaches the model an alias pattern gives it.
    reply = openai.OpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="gpt-3.5-turbo", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content is not None


def test_rerank_model(api: Appliance) -> None:
    for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
        r = httpx.post(api.url + path, headers=_headers(), timeout=60,
                       json={"query": "what is a cat", "documents": ["a cat is an animal", "paris is in france"]})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert sorted(x["index"] for x in results) == [0, 1]
        assert r.json()["model"] == "gemma-3-270m-rerank"


def test_bare_host_urls_and_the_readme_request(api: Appliance) -> None:
    r = httpx.post(api.url + "/v1/completions", headers=_headers(), timeout=60,
                   json={"prompt": "Paris is the capital of", "max_tokens": 16, "temperature": 0})
    assert "France" in r.json()["choices"][0]["text"]
    assert r.json()["model"] == "gemma-3-270m"
    bare = httpx.post(api.url + "/chat/completions", headers=_headers(), timeout=60,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert bare.status_code == 200 and bare.json()["model"] == "gemma-3-270m"


def test_unexposed_routes(api: Appliance) -> None:
    for method, path in (("GET", "/slots"), ("POST", "/models/load"), ("GET", "/metrics")):
        r = httpx.request(method, api.url + path, headers=_headers(), json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_exposed", (path, r.text)


def test_alternating_streams_never_meet_a_connection_llama_server_closed(api: Appliance) -> None:
    """llama-server closes a kept-alive connection after a streamed response; a proxy that pools it answers the next
    request 502 (seen a few times in every few hundred requests)."""
    statuses: dict[int, int] = {}
    body: dict[str, Any] = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
    with httpx.Client(base_url=api.url, headers=_headers(), timeout=60) as client:
        for i in range(1500):
            r = client.post("/v1/completions", json={**body, "stream": i % 2 == 0})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert statuses == {200: 1500}
