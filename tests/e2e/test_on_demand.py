"""Models on demand, with the real llama-server and Gemma 3 270M registered under several names.

The CPU budget (set exactly with memory_mib) holds the always model, the small idle-unloading model and one of the two
large on-demand models, so a request for one of those must first unload the other.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL_FILE, Appliance, serving
from tests.helpers import free_port, write_config

pytestmark = pytest.mark.timeout(240)


def model(name: str, load: str = "on_demand", mib: int = 400, **extra: Any) -> dict[str, Any]:
    return {"name": name, "file": MODEL_FILE, "kind": "chat", "port": free_port(), "ctx_size": 1024, "threads": 1,
            "parallel": 2, "load": load, "memory_mib": mib, **extra}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("on_demand")
    models = [model("always-a", "always"), model("od-b"), model("od-c"), model("od-d", mib=100, idle_unload_s=2)]
    sections = {"memory": {"CPU": 1000}, "server": {"load_timeout_s": 60, "min_residency_s": 1}}
    with serving(tmp, models, sections) as app:
        yield app


def events(app: Appliance, kind: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
    path = Path(app.doc["supervision"]["runtime_dir"]) / "events.jsonl"
    found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in found if (kind is None or e.get("type") == kind) and (model is None or e.get("model") == model)]


def last_request(app: Appliance, model: str) -> dict[str, Any]:
    """The newest request event for ``model`` (the workers write them in batches, about once a second)."""
    return wait_for(lambda: ([e for e in events(app) if e.get("event") == "request" and e.get("model") == model]
                             or [None])[-1], 10, f"a request event for {model}")


def states(app: Appliance) -> dict[str, str]:
    return {n: m["state"] for n, m in httpx.get(app.url + "/health", timeout=5).json()["models"].items()}


def wait_for(check: Any, timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def ask(app: Appliance, name: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(app.url + "/v1/chat/completions", timeout=120, json={
        "model": name, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Say hi"}]})


def test_an_unloaded_model_leaves_the_host_healthy_and_its_first_request_loads_it(app: Appliance) -> None:
    health = httpx.get(app.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert states(app)["od-b"] == "unloaded"
    listed = {m["id"]: m for m in httpx.get(app.url + "/v1/models", timeout=5).json()["data"]}
    assert listed["od-b"]["state"] == "unloaded" and listed["od-b"]["load"] == "on_demand"
    assert listed["always-a"]["load"] == "always"

    client = openai.OpenAI(base_url=app.url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="od-b", max_tokens=4,
                                           messages=[{"role": "user", "content": "Say hi"}])
    assert reply.model == "od-b" and reply.choices[0].message.content is not None
    assert states(app)["od-b"] == "ready"
    loaded = events(app, "model_loaded", "od-b")
    assert len(loaded) == 1 and loaded[0]["event"] == "lifecycle" and loaded[0]["reason"] == "request"
    request = last_request(app, "od-b")
    assert request["status"] == 200 and request["load_wait_ms"] > 0


def test_a_swap_waits_for_the_stream_under_way_which_arrives_whole(app: Appliance) -> None:
    assert ask(app, "od-b").status_code == 200  # od-b loaded; od-c does not fit beside it
    lines: list[str] = []
    stream_done = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", app.url + "/v1/chat/completions", timeout=120, json={
                "model": "od-b", "stream": True, "max_tokens": 120, "temperature": 0,
                "messages": [{"role": "user", "content": "Count from one to one hundred"}]}) as r:
            assert r.status_code == 200
            lines.extend(line for line in r.iter_lines() if line)
        stream_done.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    wait_for(lambda: len(lines) > 2, what="the stream's first events")
    time.sleep(1.5)  # past od-b's residency: only its stream in flight keeps it
    t0 = time.monotonic()
    other = ask(app, "od-c")
    assert other.status_code == 200, other.text
    streamer.join(60)
    assert stream_done.is_set()
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines)
    unloaded = events(app, "model_unloaded", "od-b")[-1]
    assert unloaded["reason"] == "evicted"
    stream_end = wait_for(lambda: [e for e in events(app) if e.get("event") == "request" and e.get("stream")
                                   and e.get("model") == "od-b"], 10, "the stream's event")[-1]
    assert unloaded["ts"] >= stream_end["ts"] - 0.05  # unloaded only once the stream had ended
    assert states(app)["od-b"] == "unloaded" and states(app)["od-c"] == "ready"
    assert states(app)["always-a"] == "ready"  # the always model is never evicted
    assert not events(app, "model_unloaded", "always-a")
    assert time.monotonic() - t0 < 60


def test_concurrent_first_requests_on_both_workers_share_one_load(app: Appliance) -> None:
    # od-c is loaded: asking for od-b now means one eviction and one load, whoever asks.
    assert ask(app, "od-c").status_code == 200
    loads_before = len(events(app, "model_loaded", "od-b"))
    starts_before = len(events(app, "started", "od-b"))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(app, "od-b"), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert len(events(app, "model_loaded", "od-b")) == loads_before + 1
    assert len(events(app, "started", "od-b")) == starts_before + 1  # supervisord started it once


def test_an_idle_model_is_unloaded_after_idle_unload_s(app: Appliance) -> None:
    # A load balancer probes each model: through the load and the idle unload the host can serve od-d all along.
    probes: list[tuple[float, int, str]] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=app.url, timeout=5) as c:
            while not done.is_set() and len(probes) < 2000:
                r = c.get("/health/models/od-d")
                probes.append((time.monotonic(), r.status_code, r.json().get("state", "")))
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        assert ask(app, "od-d").status_code == 200
        t0 = time.monotonic()
        wait_for(lambda: states(app)["od-d"] == "unloaded", 15, "od-d to be unloaded")
        time.sleep(1.5)  # the workers' next readiness polls after the unload
    finally:
        done.set()
        prober.join(10)
    assert time.monotonic() - t0 >= 1.5
    assert events(app, "model_unloaded", "od-d")[-1]["reason"] == "idle"
    seen = {state for _, _, state in probes}
    assert {"ready", "unloaded"} <= seen, seen
    assert all(status == 200 for _, status, _ in probes), [p for p in probes if p[1] != 200]


def test_metrics_count_loads_unloads_and_the_budget(app: Appliance) -> None:
    text = httpx.get(f"http://127.0.0.1:{app.doc['metrics']['port']}/metrics", timeout=10).text
    assert 'appliance_memory_budget_bytes{device="CPU"} 1.048576e+09' in text
    assert 'appliance_model_loads_total{model="od-b"}' in text
    assert 'appliance_model_unloads_total{model="od-b",reason="evicted"}' in text
    assert 'appliance_model_load_seconds_count{model="od-b"}' in text
    assert 'appliance_model_load_waiting{model="od-c"} 0.0' in text
    # od-c is unloaded: not ready, and not down either (the ApplianceModelDown alert leaves it out).
    assert 'appliance_model_state{model="od-c",state="unloaded"} 1.0' in text
    assert 'appliance_model_ready{model="od-c"} 0.0' in text


def test_an_operator_stop_is_accounted_for(app: Appliance) -> None:
    assert ask(app, "od-c").status_code == 200
    app.supervisorctl("stop", "model-od-c")
    wait_for(lambda: states(app)["od-c"] == "unloaded", 10, "od-c to show unloaded")
    assert events(app, "model_unloaded", "od-c")[-1]["reason"] == "operator"
    assert ask(app, "od-c").status_code == 200  # and loaded again on demand


def test_a_reload_adds_an_on_demand_model_without_touching_the_others(app: Appliance) -> None:
    before = app.pids()
    doc = json.loads(json.dumps(app.doc))
    doc["models"].append(model("od-e", mib=100))
    write_config(app.config, doc)
    r = subprocess.run([sys.executable, "-m", "appliance", "reload", "--config", str(app.config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model-od-e" in r.stdout
    after = app.pids()
    # The exporter and the event listener see the list of models, so they restart; the models and the proxy do not.
    kept = ["model-always-a", "proxy", *(p for p in ("model-od-b", "model-od-c") if p in before)]
    assert len(kept) == 3  # one of the large on-demand models is loaded
    for program in kept:
        assert after[program] == before[program], program
    assert "model-od-e" not in after  # added, not started: it loads on its first request
    assert ask(app, "od-e").status_code == 200
    app.doc = doc
