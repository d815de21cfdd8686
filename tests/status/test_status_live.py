"""`appliance status` against a real appliance (the real llama-server and Gemma 3 270M under four names): one model
busy with streams, one restarting after kill -9, one failed (a corrupt GGUF file, FATAL after one retry), and one on
demand that stays unloaded (the model manager's row)."""

from __future__ import annotations

import contextlib
import json
import os
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

from tests.e2e.conftest import MODEL_FILE, Appliance, start_appliance
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.timeout(150)


def model(name: str, parallel: int, file: str = MODEL_FILE) -> dict[str, Any]:
    return {"name": name, "file": file, "kind": "chat", "port": free_port(), "ctx_size": 1024, "threads": 1,
            "parallel": parallel}


def status(app: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "status", "--config", str(app.config), *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


def wait_states(app: Appliance, want: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            seen = {n: m["state"] for n, m in httpx.get(app.url + "/health", timeout=2).json()["models"].items()}
        if all(seen.get(n) == s for n, s in want.items()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{seen} never became {want}:\n{app.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("status")
    (tmp / "models").mkdir()
    (tmp / "models" / "corrupt.gguf").write_bytes(b"GGUF" + bytes(4096))
    # busy: 4096 tokens of context per slot, so that its streams outlast the test.
    models = [{**model("busy", 2), "ctx_size": 8192}, model("crashy", 1), model("broken", 1, "corrupt.gguf"),
              {**model("later", 1), "load": "on_demand"}]
    # A start shorter than stable_uptime_s is a failed one: the corrupt model fails well within it (FATAL after one
    # retry) even while four models start on two cores.
    app = start_appliance(tmp, models, max_restarts=1, stable_uptime_s=5, backoff_initial_s=0.2)
    try:
        wait_states(app, {"busy": "ready", "crashy": "ready", "broken": "failed", "later": "unloaded"})
        yield app
    finally:
        app.stop()


def test_status_shows_busy_restarting_and_failed_models(app: Appliance) -> None:
    stop = threading.Event()
    tokens = [0, 0, 0]

    def stream(i: int) -> None:
        with httpx.stream("POST", app.url + "/v1/chat/completions", timeout=60, json={
                "model": "busy", "stream": True, "max_tokens": 2000, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Count from one to one thousand"}]}) as r:
            for line in r.iter_lines():
                tokens[i] += line.startswith("data: {")
                if stop.is_set():
                    return

    # Three streams on two slots: two processing, one waiting.
    streams = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in streams:
        t.start()
    # Killed once RUNNING (past stable_uptime_s): a crash that supervisord restarts, not a failed start.
    deadline = time.monotonic() + 30
    while "RUNNING" not in app.supervisorctl("status", "model-crashy") and time.monotonic() < deadline:
        time.sleep(0.2)
    crashy = app.pids()["model-crashy"]
    stopped = 0
    try:
        deadline = time.monotonic() + 30
        while sum(1 for n in tokens if n) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        # The third stream reaches the proxy whenever its thread gets the CPU: wait until status counts it waiting.
        waiting = 0
        while waiting != 1 and time.monotonic() < deadline:
            waiting = next(m for m in json.loads(status(app, "--json").stdout)["models"] if m["name"] == "busy")[
                "waiting"]
        # kill -9, then hold the restarted llama-server still (SIGSTOP) so "restarting" lasts as long as the check.
        os.kill(crashy, signal.SIGKILL)
        while not stopped and time.monotonic() < deadline:
            new = app.pids().get("model-crashy", 0)
            if new and new != crashy:
                os.kill(new, signal.SIGSTOP)
                stopped = new
            time.sleep(0.05)
        wait_states(app, {"crashy": "restarting"}, 10)

        plain = status(app)
        doc_run = status(app, "--json")
        watch = subprocess.Popen([sys.executable, "-m", "appliance", "status", "--config", str(app.config),
                                  "--watch", "--json"], stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert watch.stdout is not None
        watched = [json.loads(watch.stdout.readline()) for _ in range(2)]
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 1
    finally:
        stop.set()
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        for t in streams:
            t.join(30)
    print(plain.stdout)

    assert plain.returncode == 1, plain.stderr
    lines = plain.stdout.splitlines()
    assert lines[2].split()[:3] == ["MODEL", "STATE", "SINCE"]
    rows = {line.split()[0]: line.split() for line in lines[3:7]}
    assert rows["busy"][1] == "ready" and rows["busy"][5] == "2/2"
    assert rows["crashy"][1] == "restarting" and rows["broken"][1] == "failed"
    assert rows["later"][1:4] == ["(on", "demand)", "unloaded"]
    assert "NOT HEALTHY:" in lines
    assert "  model crashy: restarting" in lines

    assert doc_run.returncode == 1
    doc = json.loads(doc_run.stdout)
    models = {m["name"]: m for m in doc["models"]}
    busy, crash, broken = models["busy"], models["crashy"], models["broken"]
    assert doc["healthy"] is False and doc["health"] == "unhealthy"
    assert waiting == 1
    assert busy["slots_busy"] == 2 and busy["slots_total"] == 2 and busy["waiting"] in (0, 1)
    assert busy["tokens_per_s"] > 0 and doc["tokens_window_s"] >= 1
    assert busy["memory"][0]["device"] == "CPU" and busy["memory"][0]["source"] == "rss"
    assert busy["memory"][0]["mib"] > 50 and busy["pid"] and busy["last_error"] == ""
    assert crash["state"] == "restarting" and crash["restarts"] >= 1 and crash["pid"] == stopped
    assert broken["state"] == "failed" and broken["pid"] is None
    assert broken["last_error"] and "/" not in broken["last_error"]
    programs = {p["name"]: p for p in doc["programs"]}
    assert set(programs) == {"proxy", "exporter", "events", "lifecycle"}
    assert all(p["state"] == "RUNNING" and p["pid"] and p["uptime_s"] > 0 for p in programs.values())
    assert any(p.startswith("model broken: failed (") for p in doc["problems"])
    later = models["later"]
    assert later["state"] == "unloaded" and later["memory"] == [] and later["waiting"] == 0 and later["pid"] is None
    assert not any("later" in p for p in doc["problems"]) and doc["notes"] == []

    assert watched[1]["taken_at"] - watched[0]["taken_at"] >= 1.5
    assert watched[1]["tokens_window_s"] > watched[0]["tokens_window_s"]


def test_status_of_a_host_where_nothing_runs(tmp_path: Path, app: Appliance) -> None:
    config = tmp_path / "appliance.toml"
    text = Path(app.config).read_text().replace(app.doc["supervision"]["runtime_dir"], str(tmp_path / "run"))
    for m in app.doc["models"]:
        text = text.replace(f"port = {m['port']}", f"port = {free_port()}")
    text = text.replace(f"port = {app.doc['server']['port']}", f"port = {free_port()}")
    config.write_text(text)
    r = subprocess.run([sys.executable, "-m", "appliance", "status", "--config", str(config)], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
    assert r.returncode == 1
    assert "not running: no supervisord listens on" in r.stdout
    assert "proxy /health: unreachable" in r.stdout
