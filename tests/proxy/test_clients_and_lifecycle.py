"""API keys, the official openai SDK, unreachable children and graceful draining, against real gunicorn."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import Proxy, free_port, proxy_over_stubs, stream_under_way, stub_config, write_config
from tests.stub_llama import StubLlama


@pytest.fixture(scope="module")
def keyed_proxy(stubs: tuple[StubLlama, StubLlama], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp: Path = tmp_path_factory.mktemp("keyed")
    keys = tmp / "keys"
    keys.write_text("# operators' keys\nsk-first\n\nsk-second\n")
    doc = stub_config(tmp, stubs[0].port, stubs[1].port, api_keys_file=str(keys))
    p = Proxy(write_config(tmp / "appliance.toml", doc), doc["server"]["port"]).start()
    yield p
    p.stop()


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Bearer sk-firs", "Basic sk-first", "Bearer", "sk-first"])
def test_missing_or_wrong_key_gives_401(keyed_proxy: Proxy, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/embeddings")):
        r = httpx.request(method, keyed_proxy.url + path, content=b"{}", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["x-request-id"]


def test_any_configured_key_is_accepted_and_not_forwarded(keyed_proxy: Proxy, chat_stub: StubLlama) -> None:
    for key in ("sk-first", "sk-second"):
        r = httpx.post(keyed_proxy.url + "/v1/chat/completions", content=b"{}",
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert "authorization" not in {k.lower() for k in chat_stub.received[-1].headers}


def test_health_and_livez_need_no_key(keyed_proxy: Proxy) -> None:
    assert httpx.get(keyed_proxy.url + "/health").status_code == 200
    assert httpx.get(keyed_proxy.url + "/livez").status_code == 200
    assert httpx.get(keyed_proxy.url + "/health/models/chat-a").status_code == 200
    # Only the probes are open: a path that merely starts like one is not.
    assert httpx.get(keyed_proxy.url + "/healthz").status_code == 401


def test_openai_sdk_sync(keyed_proxy: Proxy, chat_stub: StubLlama) -> None:
    client = openai.OpenAI(base_url=keyed_proxy.url + "/v1", api_key="sk-second", max_retries=0)
    out = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "h\u00e9llo"
    assert out.usage is not None and out.usage.total_tokens == 5
    stream = client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, extra_body={"stub": "stream", "n": 3, "delay": 0.01})
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == "tok0 tok1 tok2 "
    emb = client.embeddings.create(model="embed-a", input="hi")
    assert emb.data[0].embedding == [0.25, -0.5, 1.0]
    assert [m.id for m in client.models.list()] == ["chat-a", "embed-a"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_proxy.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])


def test_openai_sdk_async(keyed_proxy: Proxy) -> None:
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=keyed_proxy.url + "/v1", api_key="sk-first", max_retries=0)
        out = await client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(
            model="chat-a", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"stub": "stream", "n": 2, "delay": 0.01})
        parts = [c.choices[0].delta.content or "" async for c in stream]
        await client.close()
        return out.choices[0].message.content or "", "".join(parts)

    assert asyncio.run(run()) == ("h\u00e9llo", "tok0 tok1 ")


def test_connection_reset_gives_502(proxy: Proxy, chat_stub: StubLlama) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", content=b'{"stub":"reset"}')
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"


def test_dead_child_gives_502_then_503_and_other_model_still_serves(tmp_path: Path) -> None:
    chat, embed = StubLlama(free_port()), StubLlama(free_port())
    chat.start()
    embed.start()
    # One worker: a second one could still be booting and would never have seen the model ready.
    doc = stub_config(tmp_path, chat.port, embed.port, workers=1)
    p = Proxy(write_config(tmp_path / "appliance.toml", doc), doc["server"]["port"]).start()
    try:
        chat.stop()
        statuses = [httpx.post(p.url + "/v1/chat/completions", content=b"{}").status_code for _ in range(6)]
        assert set(statuses) <= {502, 503}, statuses
        time.sleep(1.5)  # one readiness poll in every worker
        r = httpx.post(p.url + "/v1/chat/completions", content=b"{}")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert httpx.post(p.url + "/v1/embeddings", content=b'{"input":"x"}').status_code == 200
        h = httpx.get(p.url + "/health")
        assert h.status_code == 503
        assert h.json()["models"]["chat-a"]["state"] == "restarting"
    finally:
        p.stop()
        embed.stop()


def one_worker_proxy(tmp_path: Path) -> contextlib.AbstractContextManager[tuple[Proxy, dict[str, Any], Path]]:
    return proxy_over_stubs(tmp_path, workers=1, graceful_timeout_s=20)


def test_sigterm_drains_streams_and_reports_draining(tmp_path: Path) -> None:
    with one_worker_proxy(tmp_path) as (p, _, _):
        assert p.proc is not None
        t, received = stream_under_way(p, 10)
        # As supervisord stops it (stopasgroup): the arbiter and every worker get SIGTERM at once.
        os.killpg(p.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        h = httpx.get(p.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "draining"
        r = httpx.post(p.url + "/v1/chat/completions", content=b"{}")
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        t.join(20)
        assert b"".join(received).endswith(b"data: [DONE]\n\n")
        assert p.proc.wait(15) == 0


def test_sighup_replaces_workers_without_refusing_or_draining(tmp_path: Path) -> None:
    """What `appliance reload` does to the proxy: new workers with the new settings, old ones retire quietly."""
    with one_worker_proxy(tmp_path) as (p, doc, config), httpx.Client(base_url=p.url) as kept:
        assert p.proc is not None
        arbiter = p.proc.pid

        def workers() -> set[int]:
            return {int(x) for x in Path(f"/proc/{arbiter}/task/{arbiter}/children").read_text().split()}

        old = workers()
        assert kept.get("/v1/models").status_code == 200  # a kept-alive connection to the old worker
        t, received = stream_under_way(p, 12)
        write_config(config, {**doc, "server": {**doc["server"], "workers": 2}})
        os.kill(arbiter, signal.SIGHUP)
        statuses: list[int | str] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (len(workers() - old) < 2 or workers() & old):
            try:
                statuses.append(httpx.get(p.url + "/health", timeout=5).status_code)
            except httpx.HTTPError as e:
                statuses.append(repr(e))
            time.sleep(0.02)
        new = workers()
        assert len(new) == 2 and not new & old, (old, new)
        assert statuses and set(statuses) == {200}, statuses
        t.join(20)
        assert b"".join(received).endswith(b"data: [DONE]\n\n")
        # The old worker served the kept connection's next request, if it got there first, and closed it; either way
        # the client is served, by a new worker on a new connection at the latest.
        assert kept.get("/v1/models").status_code == 200
        assert kept.get("/v1/models").status_code == 200
