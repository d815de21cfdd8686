"""Per-client policies with the real llama-server and model, through both official SDKs: allow-lists, concurrency,
request and token windows with their headers and the SDKs' retries, a daily budget kept across a reload and a restart,
and a usage ledger equal to what the clients were told."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import Appliance, chat_model, serving
from tests.helpers import REPO, free_port, write_config

pytestmark = pytest.mark.timeout(300)

KEYS = {"team": "sk-team", "editor": "sk-editor", "batch": "sk-batch", "meter": "sk-meter", "meter-a": "sk-meter-a",
        "tokens": "sk-tokens", "budget": "sk-budget", "ledgered": "sk-ledgered"}
CLIENTS = {
    "editor": {"models": ["code"]},
    "batch": {"max_concurrent": 2},
    "meter": {"requests_per_minute": 3},
    "meter-a": {"requests_per_minute": 2},
    "tokens": {"tokens_per_minute": 60},
    "budget": {"tokens_per_day": 60},
}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("clients")
    (tmp / "keys").write_text("".join(f"{name}: {key}\n" for name, key in KEYS.items()))
    models = [{**chat_model(free_port(), "chat"), "chat_template": "gemma", "aliases": ["gpt-*", "claude-*"]},
              {**chat_model(free_port(), "code"), "chat_template": "gemma"}]
    with serving(tmp, models, {"server": {"api_keys_file": str(tmp / "keys")}, "clients": CLIENTS}) as app:
        yield app


def oai(app: Appliance, client: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=KEYS[client], max_retries=retries)


def post(app: Appliance, client: str, model: str = "chat", path: str = "/v1/chat/completions", max_tokens: int = 4,
         **extra: Any) -> httpx.Response:
    return httpx.post(app.url + path, timeout=120, headers={"Authorization": f"Bearer {KEYS[client]}"},
                      json={"model": model, "max_tokens": max_tokens, "messages": HI, **extra})


def usage_report(app: Appliance, by: str = "client") -> dict[str, dict[str, Any]]:
    r = subprocess.run([sys.executable, "-m", "appliance", "usage", "--config", str(app.config), "--by", by,
                        "--format", "json"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return {row["client"]: row for row in json.loads(r.stdout)}


def test_a_client_limited_to_one_model_neither_reaches_nor_sees_the_others(app: Appliance) -> None:
    client = oai(app, "editor")
    assert [m.id for m in client.models.list()] == ["code"]
    assert client.chat.completions.create(model="code", max_tokens=2, messages=HI).model == "code"
    for name in ("chat", "gpt-4o"):  # by name and by an alias pattern: as if neither existed
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=name, max_tokens=2, messages=HI)
        assert e.value.code == "model_not_found" and "available: code" in str(e.value), e.value
    assert post(app, "editor", model="").json()["model"] == "code"  # no model: its own first chat model
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(base_url=app.url, api_key=KEYS["editor"], max_retries=0).messages.create(
            model="claude-3-5-haiku-latest", max_tokens=2, messages=HI)
    # Everyone else sees both.
    assert sorted(m.id for m in oai(app, "team").models.list()) == ["chat", "code"]
    r = httpx.get(app.url + "/props", params={"model": "chat"}, headers={"Authorization": f"Bearer {KEYS['editor']}"})
    assert r.status_code == 404


@contextlib.contextmanager
def two_streams(app: Appliance, client: str) -> Iterator[tuple[httpx.Response, httpx.Response]]:
    """Two streamed chat completions of ``client`` in flight."""
    headers = {"Authorization": f"Bearer {KEYS[client]}"}
    body = {"model": "chat", "max_tokens": 48, "stream": True, "messages": [{"role": "user", "content": "Count on."}]}
    url = app.url + "/v1/chat/completions"
    with (httpx.Client(timeout=120) as c1, httpx.Client(timeout=120) as c2,
          c1.stream("POST", url, json=body, headers=headers) as s1, c2.stream("POST", url, json=body, headers=headers)
          as s2):
        assert s1.status_code == s2.status_code == 200
        yield s1, s2


def test_max_concurrent_refuses_the_request_over_it_at_once(app: Appliance) -> None:
    with two_streams(app, "batch") as (s1, s2):
        t0 = time.monotonic()
        third = post(app, "batch")
        assert time.monotonic() - t0 < 2  # refused, not queued
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        assert third.json()["error"]["code"] == "concurrency_limit_exceeded", third.text
        assert "clients.batch.max_concurrent" in third.json()["error"]["message"]
        assert post(app, "team").status_code == 200  # other clients are not affected
        for s in (s1, s2):
            for _ in s.iter_bytes():
                pass
    assert post(app, "batch").status_code == 200  # its slots are back
    metrics = httpx.get(f"http://127.0.0.1:{app.doc['metrics']['port']}/metrics", timeout=10).text
    assert 'appliance_policy_refused_total{client="batch",code="concurrency_limit_exceeded"} 1.0' in metrics


def test_requests_per_minute_with_openais_headers_and_the_sdk_waiting_as_told(app: Appliance) -> None:
    client = oai(app, "meter")
    for remaining in (2, 1, 0):
        raw = client.chat.completions.with_raw_response.create(model="chat", max_tokens=2, messages=HI)
        h = raw.headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("3", str(remaining))
        assert h["x-ratelimit-reset-requests"] in ("59s", "1m0s"), h["x-ratelimit-reset-requests"]
    refused = post(app, "meter")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded", refused.text
    assert "clients.meter.requests_per_minute" in refused.json()["error"]["message"]
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= 60 and refused.headers["x-ratelimit-remaining-requests"] == "0"
    # The SDK reads Retry-After, waits that long and succeeds on its retry.
    t0 = time.monotonic()
    done = oai(app, "meter", retries=1).chat.completions.create(model="chat", max_tokens=2, messages=HI)
    assert done.choices and time.monotonic() - t0 >= wait - 1.5


def test_anthropics_headers_on_its_route(app: Appliance) -> None:
    client = anthropic.Anthropic(base_url=app.url, api_key=KEYS["meter-a"], max_retries=0)
    for remaining in (1, 0):
        raw = client.messages.with_raw_response.create(model="chat", max_tokens=2, messages=HI)
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert raw.headers["anthropic-ratelimit-requests-remaining"] == str(remaining)
        reset = time.mktime(time.strptime(raw.headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ"))
        assert 0 < reset - time.mktime(time.gmtime()) <= 61
    with pytest.raises(anthropic.RateLimitError) as e:
        client.messages.create(model="chat", max_tokens=2, messages=HI)
    assert int(e.value.response.headers["retry-after"]) <= 60


def test_tokens_per_minute_is_post_paid(app: Appliance) -> None:
    spent = 0
    for _ in range(10):
        r = post(app, "tokens", max_tokens=8)
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        assert spent < 60  # admitted while under the limit...
        spent += r.json()["usage"]["total_tokens"]
        assert r.headers["x-ratelimit-limit-tokens"] == "60"
    assert spent >= 60  # ...and the request that crossed it finished
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["x-ratelimit-remaining-tokens"] == "0" and "clients.tokens.tokens_per_minute" in r.text


def spend_budget(app: Appliance) -> httpx.Response:
    for _ in range(10):
        r = post(app, "budget", max_tokens=8)
        if r.status_code != 200:
            return r
    raise AssertionError("the daily budget never ran out")


def refused_for_the_day(r: httpx.Response) -> None:
    assert r.status_code == 429 and r.json()["error"]["code"] == "daily_token_budget_exceeded", r.text
    midnight = (time.time() // 86400 + 1) * 86400
    assert abs(int(r.headers["retry-after"]) - (midnight - time.time())) < 5
    assert r.headers["x-should-retry"] == "false"


def test_a_daily_budget_holds_across_a_reload(app: Appliance) -> None:
    refused_for_the_day(spend_budget(app))
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError):  # x-should-retry: false, so the SDK does not retry in vain
        oai(app, "budget", retries=2).chat.completions.create(model="chat", max_tokens=2, messages=HI)
    assert time.monotonic() - t0 < 2
    reload(app)
    refused_for_the_day(post(app, "budget"))
    assert post(app, "team").status_code == 200
    # A reload applies a changed policy at once, and its counts go on.
    reload(app, {**CLIENTS, "budget": {"tokens_per_day": 10**6}})
    assert post(app, "budget").status_code == 200
    reload(app, CLIENTS)
    refused_for_the_day(post(app, "budget"))


def reload(app: Appliance, clients: dict[str, Any] | None = None) -> None:
    if clients is not None:
        app.doc["clients"] = clients
        write_config(app.config, app.doc)
    r = subprocess.run([sys.executable, "-m", "appliance", "reload", "--config", str(app.config)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_the_ledger_equals_the_usage_the_clients_were_told(app: Appliance) -> None:
    before = usage_report(app).get("ledgered", {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
    told = [0, 0]
    client = oai(app, "ledgered")
    for i in range(3):
        out = client.chat.completions.create(model="chat", max_tokens=3 + i, messages=HI)
        assert out.usage is not None
        told[0] += out.usage.prompt_tokens
        told[1] += out.usage.completion_tokens
    for chunk in client.chat.completions.create(model="chat", max_tokens=5, messages=HI, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            told[0] += chunk.usage.prompt_tokens
            told[1] += chunk.usage.completion_tokens
    claude = anthropic.Anthropic(base_url=app.url, api_key=KEYS["ledgered"], max_retries=0)
    msg = claude.messages.create(model="chat", max_tokens=4, messages=HI)
    told[0] += msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    told[1] += msg.usage.output_tokens
    with claude.messages.stream(model="chat", max_tokens=6, messages=HI) as stream:
        final = stream.get_final_message()
    told[0] += final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    told[1] += final.usage.output_tokens
    time.sleep(2.5)  # the workers write the ledger about once a second
    after = usage_report(app)["ledgered"]
    assert after["requests"] - before["requests"] == 6
    assert (after["prompt_tokens"] - before["prompt_tokens"], after["completion_tokens"] - before["completion_tokens"]
            ) == tuple(told), (before, after, told)
    metrics = httpx.get(f"http://127.0.0.1:{app.doc['metrics']['port']}/metrics", timeout=10).text
    assert 'appliance_tokens_total{client="ledgered",direction="completion",model="chat"}' in metrics


def proxy_workers(app: Appliance) -> list[int]:
    arbiter = app.pids()["proxy"]
    out = subprocess.run(["pgrep", "-P", str(arbiter)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_the_requests_in_flight_of_killed_workers_are_freed(app: Appliance) -> None:
    with two_streams(app, "batch"):
        assert post(app, "batch").status_code == 429  # its two are in flight
        for pid in proxy_workers(app):
            os.kill(pid, signal.SIGKILL)
    # The workers that counted them are gone, and so are their requests: the client has its two again.
    deadline = time.monotonic() + 60
    statuses = []
    while time.monotonic() < deadline:
        try:
            statuses.append(post(app, "batch").status_code)
        except httpx.TransportError:
            statuses.append(0)
        if statuses[-1] == 200:
            break
        time.sleep(0.5)
    assert statuses[-1] == 200 and 429 not in statuses, statuses


def test_the_ledger_and_the_budget_survive_kill_9_and_a_restart(app: Appliance) -> None:
    assert post(app, "ledgered").status_code == 200
    time.sleep(2.5)
    before = usage_report(app)
    for pid in proxy_workers(app):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and post(app, "team").status_code != 200:
        time.sleep(0.5)
    assert usage_report(app)["ledgered"] == before["ledgered"]  # what was written stays written
    refused_for_the_day(post(app, "budget"))
    # A restart of the whole appliance after a reboot: the runtime directory is gone, the ledger is not.
    app.stop()
    shutil.rmtree(Path(app.doc["supervision"]["runtime_dir"]) / "clients")
    log = app.log.with_name("up-again.log")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "up", "--config", str(app.config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    again = Appliance(app.config, app.doc, app.url, proc, log)
    try:
        again.wait_health(200)
        refused_for_the_day(post(again, "budget"))
        assert usage_report(again)["budget"]["requests"] >= 2
        check = subprocess.run([sys.executable, "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1])"
                                ".execute('pragma integrity_check').fetchone()[0])",
                                str(Path(app.doc["supervision"]["state_dir"]) / "usage.sqlite3")],
                               capture_output=True, text=True)
        assert check.stdout.strip() == "ok", check
    finally:
        again.stop()
