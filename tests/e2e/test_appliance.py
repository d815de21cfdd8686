"""The whole appliance with the real llama-server and Gemma 3 270M under supervisord (SPEC §1-§3, §6)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Appliance, chat_model, start_appliance
from tests.helpers import free_port, samples, value


def client(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_all_programs_running(appliance: Appliance) -> None:
    status = appliance.supervisorctl("status")
    for program in ("model-gemma-3-270m", "model-gemma-3-270m-embed", "proxy", "events"):
        assert any(line.split()[:2] == [program, "RUNNING"] for line in status.splitlines()), status


def test_health_was_503_while_loading_then_200(appliance: Appliance) -> None:
    # Recorded by the fixture while the models loaded; the proxy itself starts faster than a model loads.
    assert 503 in appliance.health_seen
    assert appliance.health_seen[-1] == 200
    assert appliance.health_seen.index(503) < appliance.health_seen.index(200)
    doc = httpx.get(appliance.url + "/health").json()
    assert doc["status"] == "ok" and doc["warm_up_state"] == "ready" and doc["model"] == "gemma-3-270m"


def test_chat_completion_with_openai_sdk(appliance: Appliance) -> None:
    out = client(appliance).chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0.0,
        seed=1)
    assert out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens > 0
    assert out.model == "gemma-3-270m"  # the name the client asked for, never the model file's path


def test_streamed_chat_completion(appliance: Appliance) -> None:
    stream = client(appliance).chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, stream=True)
    chunks = [c for c in stream]
    assert len(chunks) > 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_completion_and_embeddings_and_models(appliance: Appliance) -> None:
    c = client(appliance)
    out = c.completions.create(model="gemma-3-270m", prompt="The sky is", max_tokens=5)
    assert out.choices[0].text
    emb = c.embeddings.create(model="gemma-3-270m-embed", input=["hello", "world"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 100
    assert emb.data[0].embedding != emb.data[1].embedding
    assert [m.id for m in c.models.list()] == ["gemma-3-270m", "gemma-3-270m-embed"]


def _busy_slots(app: Appliance) -> int:
    slots = httpx.get(f"http://127.0.0.1:{app.model_port('gemma-3-270m')}/slots", timeout=5).json()
    return sum(1 for s in slots if s.get("is_processing"))


def test_aborted_stream_frees_the_slot(appliance: Appliance) -> None:
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", appliance.url + "/v1/chat/completions", json=body, timeout=60) as r:
        it = r.iter_raw()
        next(it)
        next(it)
        assert _busy_slots(appliance) == 1
    gone = time.monotonic()
    while _busy_slots(appliance) and time.monotonic() - gone < 1.0:
        time.sleep(0.05)
    assert _busy_slots(appliance) == 0, "llama-server kept generating after the client left"


def scrape(app: Appliance) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(f"http://127.0.0.1:{app.doc['metrics']['port']}/metrics", timeout=10)
    assert r.status_code == 200
    return samples(r.text)


def test_one_scrape_has_proxy_model_and_supervisor_metrics(appliance: Appliance) -> None:
    client(appliance).embeddings.create(model="gemma-3-270m-embed", input="x")
    parsed = scrape(appliance)
    for model in ("gemma-3-270m", "gemma-3-270m-embed"):
        assert value(parsed, "appliance_model_up", model=model) == 1
        assert value(parsed, "appliance_model_ready", model=model) == 1
        assert any(n.startswith("llamacpp:") and ("model", model) in ls for n, ls in parsed)
        assert value(parsed, "appliance_program_up", program=f"model-{model}") == 1
    assert value(parsed, "appliance_program_up", program="proxy") == 1
    assert value(parsed, "appliance_program_state", program="proxy", state="RUNNING") == 1
    assert value(parsed, "appliance_requests_total", route="/v1/embeddings", model="gemma-3-270m-embed") >= 1
    assert value(parsed, "appliance_program_start_time_seconds", program="proxy") > 1.6e9


def test_promtool_finds_nothing_but_llama_servers_own_names(appliance: Appliance) -> None:
    text = httpx.get(f"http://127.0.0.1:{appliance.doc['metrics']['port']}/metrics", timeout=10).text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    # llama-server names its metrics "llamacpp:..."; Prometheus accepts them, promtool's linter frowns on the colon.
    assert problems and all(p.startswith("llamacpp:") and "should not contain ':'" in p for p in problems), problems


def test_kill_9_of_a_model_gives_503_at_once_and_recovers(appliance: Appliance) -> None:
    before = appliance.pids()
    pid = before["model-gemma-3-270m"]
    restarts_before = value(scrape(appliance), "appliance_program_restarts_total", program="model-gemma-3-270m")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    statuses: list[int] = []
    while time.monotonic() - t0 < 2.0:
        statuses.append(httpx.post(appliance.url + "/v1/chat/completions", json={"max_tokens": 1}, timeout=30)
                        .status_code)
        if statuses[-1] == 503:
            break
    assert statuses[-1] == 503, statuses
    assert set(statuses) <= {502, 503}
    # The other model is not affected meanwhile, and the scrape still succeeds.
    assert httpx.post(appliance.url + "/v1/embeddings", json={"input": "x"}, timeout=30).status_code == 200
    parsed = scrape(appliance)
    assert value(parsed, "appliance_model_up", model="gemma-3-270m-embed") == 1
    # Each worker polls once a second: wait until /health shows the restart and the model ready again.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(appliance.url + "/health", timeout=5)
        state = r.json()["models"]["gemma-3-270m"]
        if r.status_code == 200 and state["restarts"] >= 1:
            break
        time.sleep(0.2)
    assert r.status_code == 200 and state == {**state, "state": "ready"} and state["restarts"] >= 1, r.text
    appliance.wait_running()
    after = appliance.pids()
    assert after["model-gemma-3-270m"] != pid
    restarts = value(scrape(appliance), "appliance_program_restarts_total", program="model-gemma-3-270m")
    assert restarts == restarts_before + 1
    events_path = Path(appliance.doc["supervision"]["runtime_dir"]) / "events.jsonl"
    lifecycle = [e for e in map(json.loads, events_path.read_text().splitlines())
                 if e["event"] == "lifecycle" and e.get("model") == "gemma-3-270m" and e["ts"] >= killed_at - 0.01]
    types = [e["type"] for e in lifecycle]
    assert types[:2] == ["crashed", "restarted"], types
    assert lifecycle[0]["exit_signal"] == "SIGKILL" and lifecycle[0]["pid"] == pid
    assert "ready" in types
    assert after["model-gemma-3-270m-embed"] == before["model-gemma-3-270m-embed"]
    out = client(appliance).chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2)
    assert out.choices


def test_restarting_the_proxy_leaves_models_alone(appliance: Appliance) -> None:
    before = appliance.pids()
    assert "proxy: stopped" in appliance.supervisorctl("restart", "proxy")
    after = appliance.pids()
    assert after["proxy"] != before["proxy"]
    assert after["model-gemma-3-270m"] == before["model-gemma-3-270m"]
    assert after["model-gemma-3-270m-embed"] == before["model-gemma-3-270m-embed"]
    appliance.wait_health(200, timeout=30)


def test_lifecycle_events_are_logged(appliance: Appliance) -> None:
    events_path = Path(appliance.doc["supervision"]["runtime_dir"]) / "events.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    types = {(e.get("model"), e["type"]) for e in events if e["event"] == "lifecycle"}
    assert ("gemma-3-270m", "started") in types and ("gemma-3-270m", "running") in types
    assert ("gemma-3-270m", "ready") in types and ("gemma-3-270m-embed", "ready") in types
    requests = [e for e in events if e["event"] == "request"]
    assert any(e["route"] == "/v1/chat/completions" and e["status"] == 200 and e["usage"]["completion_tokens"] > 0
               for e in requests)


def test_corrupt_model_exhausts_its_budget_while_the_other_serves(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    models = [chat_model(free_port()),
              {"name": "broken", "file": "broken.gguf", "kind": "chat", "port": free_port(), "threads": 1}]
    app = start_appliance(tmp_path, models, max_restarts=2, backoff_initial_s=0.2, backoff_max_s=0.5)
    try:
        deadline = time.monotonic() + 120
        doc: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                doc = httpx.get(app.url + "/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            models_state = doc["models"]
            assert isinstance(models_state, dict)
            if models_state["broken"]["state"] == "failed" and models_state["gemma-3-270m"]["state"] == "ready":
                break
            time.sleep(0.5)
        assert doc.get("status") == "unhealthy", doc
        assert doc.get("warm_up_state") == "unhealthy"
        assert "FATAL" in app.supervisorctl("status", "model-broken")
        r = httpx.post(app.url + "/v1/chat/completions", json={"model": "broken"})
        assert r.status_code == 503 and r.headers["retry-after"]
        r = httpx.post(app.url + "/v1/chat/completions", json={"model": "gemma-3-270m", "max_tokens": 2,
                       "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 200
        events_path = tmp_path / "run" / "events.jsonl"
        events = [json.loads(line) for line in events_path.read_text().splitlines()]
        assert any(e.get("model") == "broken" and e.get("type") == "failed" for e in events)
        crashes = [e for e in events if e.get("model") == "broken" and e.get("type") == "crashed"]
        assert crashes and all(e["exit_status"] != 0 for e in crashes), crashes
    finally:
        app.stop()


def test_stopping_the_appliance_leaves_no_llama_server(tmp_path: Path) -> None:
    app = start_appliance(tmp_path, [chat_model(free_port())])
    app.wait_health(200)
    app.wait_running()
    pid = app.pids()["model-gemma-3-270m"]
    assert app.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _processes_using(tmp_path) == []


def _processes_using(tmp: Path) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(tmp) in cmd:
                out.append(cmd)
    return out


def test_up_refuses_ports_in_use_with_the_key_named(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        app = start_appliance(tmp_path, [chat_model(port)])
        assert app.proc.wait(30) == 1
    out = app.log.read_text()
    assert f"port of model gemma-3-270m: cannot listen on 127.0.0.1:{port}" in out
    assert not (tmp_path / "run" / "supervisord.conf").exists()
