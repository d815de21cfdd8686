"""`appliance reload` (and SIGHUP to `appliance up`) with the real llama-server: only what changed is touched."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL_FILE, Appliance, chat_model, serving
from tests.helpers import free_port, write_config


def reload_cli(app: Appliance) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "reload", "--config", str(app.config)],
                          capture_output=True, text=True, timeout=120)


def rewrite(app: Appliance, change: Any) -> None:
    change(app.doc)
    write_config(app.config, app.doc)


def worker_pids(arbiter: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(arbiter)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("reload")
    embed = {"name": "embed", "file": MODEL_FILE, "kind": "embed", "port": free_port(), "ctx_size": 512,
             "threads": 1, "parallel": 1}
    with serving(tmp, [chat_model(free_port(), "chat"), embed]) as a:
        yield a


def test_server_change_replaces_workers_only_and_a_stream_in_flight_completes(app: Appliance) -> None:
    before = app.pids()
    old_workers = worker_pids(before["proxy"])
    received: list[bytes] = []

    def consume() -> None:
        body = {"model": "chat", "prompt": "Once upon a time", "max_tokens": 160, "stream": True,
                "temperature": 0.0, "ignore_eos": True}
        with httpx.stream("POST", app.url + "/v1/completions", json=body, timeout=120) as r:
            received.extend(r.iter_raw())

    t = threading.Thread(target=consume)
    t.start()
    wait_for(lambda: len(received) > 2, 60, "the stream never started")
    rewrite(app, lambda d: d["server"].update(workers=3, request_timeout_s=90))
    # During the switch every new connection is served (by old or new workers): none refused, none told "draining".
    statuses: list[int | str] = []
    done = threading.Event()

    def probe() -> None:
        for _ in range(400):
            if done.is_set():
                return
            try:
                statuses.append(httpx.get(app.url + "/v1/models", timeout=10).status_code)
            except httpx.HTTPError as e:
                statuses.append(repr(e))
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    r = reload_cli(app)
    assert r.returncode == 0, r.stderr
    assert "replaced the proxy workers" in r.stdout and "restarted" not in r.stdout, r.stdout
    wait_for(lambda: len(worker_pids(before["proxy"]) - old_workers) == 3, 30, "no new workers")
    t.join(120)
    done.set()
    prober.join(30)
    text = b"".join(received)
    assert text.endswith(b"data: [DONE]\n\n"), text[-300:]
    assert len([ln for ln in text.split(b"\n") if ln.startswith(b"data: {")]) >= 100
    assert statuses and set(statuses) == {200}, statuses
    wait_for(lambda: not (worker_pids(before["proxy"]) & old_workers), 30, "old workers did not exit")
    after = app.pids()
    assert after == before, (before, after)  # same arbiter, same models, same exporter and listener
    assert len(worker_pids(after["proxy"])) == 3


def test_invalid_config_changes_nothing(app: Appliance) -> None:
    before = app.pids()
    conf = Path(app.doc["supervision"]["runtime_dir"]) / "supervisord.conf"
    generated = conf.read_text()
    port = app.doc["models"][0]["port"]
    rewrite(app, lambda d: d["models"][0].update(port=d["metrics"]["port"]))
    try:
        r = reload_cli(app)
        assert r.returncode == 1
        assert "models[0].port" in r.stderr and "nothing changed" in r.stderr, r.stderr
        assert conf.read_text() == generated
        assert app.pids() == before
    finally:
        rewrite(app, lambda d: d["models"][0].update(port=port))


def test_model_changes_touch_only_that_model(app: Appliance) -> None:
    before = app.pids()
    rewrite(app, lambda d: d["models"][0].update(ctx_size=1024))
    r = reload_cli(app)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["reload: restarted model-chat",
                                            "reload: replaced the proxy workers (in-flight requests finish on the "
                                            "old ones)"], r.stdout
    app.wait_running()
    app.wait_health(200)
    after = app.pids()
    assert after["model-chat"] != before["model-chat"]
    assert {k: v for k, v in after.items() if k != "model-chat"} == \
        {k: v for k, v in before.items() if k != "model-chat"}
    out = httpx.post(app.url + "/v1/completions", json={"model": "chat", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert out.status_code == 200, out.text


def test_sighup_to_up_adds_and_removes_models_leaving_the_others(app: Appliance) -> None:
    before = app.pids()
    port = free_port()
    rewrite(app, lambda d: d["models"].append({**chat_model(port, "added"), "ctx_size": 512}))
    app.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "model-added" in app.pids(), 60, "the added model never started")
    doc = app.wait_health(200)
    assert set(doc["models"]) == {"chat", "embed", "added"}
    models = httpx.get(app.url + "/v1/models").json()
    assert {m["id"] for m in models["data"]} == {"chat", "embed", "added"}
    out = httpx.post(app.url + "/v1/completions", json={"model": "added", "prompt": "Hi", "max_tokens": 2},
                     timeout=60)
    assert out.status_code == 200, out.text
    after = app.pids()
    for program in ("model-chat", "model-embed", "proxy"):
        assert after[program] == before[program], program
    assert "reload: started model-added" in app.log.read_text()

    rewrite(app, lambda d: d["models"].pop())
    app.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "model-added" not in app.pids(), 60, "the removed model is still there")
    app.wait_health(200)
    assert httpx.post(app.url + "/v1/completions", json={"model": "added", "prompt": "Hi"}).status_code == 404
    listening = subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert not listening.strip(), listening
    final = app.pids()
    for program in ("model-chat", "model-embed", "proxy"):
        assert final[program] == before[program], program
    lines = Path(app.doc["supervision"]["runtime_dir"], "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert any(e.get("type") == "ready" and e.get("model") == "added" for e in events)
