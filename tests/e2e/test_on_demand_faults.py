"""On-demand loads that fail: a corrupt GGUF, a llama-server killed while loading, a wait longer than load_timeout_s.

The CPU budget holds one of the two real models at a time, and the residency is long, so that a model busy with a
stream keeps its memory for the whole test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Appliance, serving
from tests.e2e.test_on_demand import ask, events, model, states, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("on_demand_faults")
    (tmp / "models").mkdir()
    (tmp / "models" / "corrupt.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    models = [model("od-x"), model("od-y"), {**model("od-bad"), "file": "corrupt.gguf"}]
    sections = {"memory": {"CPU": 500}, "server": {"load_timeout_s": 6, "min_residency_s": 120}}
    with serving(tmp, models, sections, backoff_initial_s=3, backoff_max_s=10) as app:
        yield app


def test_a_corrupt_model_fails_fast_with_the_reason_and_no_restart_storm(app: Appliance) -> None:
    t0 = time.monotonic()
    r = ask(app, "od-bad")
    assert r.status_code == 502, r.text
    assert time.monotonic() - t0 < 15
    error = r.json()["error"]
    assert error["code"] == "model_load_failed" and "od-bad" in error["message"]
    assert "/" not in error["message"].split("failed to load:")[1]  # the reason, without paths
    assert "gguf" in error["message"].lower() or "model" in error["message"].lower()
    assert int(r.headers["retry-after"]) >= 1
    starts = len(events(app, "started", "od-bad"))
    # Within the backoff: answered at once from what is known, nothing is started again.
    again = ask(app, "od-bad")
    assert again.status_code == 503 and "retry-after" in again.headers
    time.sleep(2)
    assert len(events(app, "started", "od-bad")) == starts
    assert events(app, "model_unloaded", "od-bad")[-1]["reason"] == "failed"
    health = httpx.get(app.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["models"]["od-bad"]["state"] == "failed"
    assert "error" in health.json()["models"]["od-bad"]
    # Everything else keeps serving.
    assert ask(app, "od-x").status_code == 200


def _llama_server_pid(app: Appliance, program: str) -> int | None:
    pid = app.pids().get(program)
    if pid is None:
        return None
    try:
        return pid if Path(f"/proc/{pid}/exe").resolve().name == "llama-server" else None
    except OSError:
        return None


def test_kill_9_of_a_loading_llama_server_answers_the_waiting_request(app: Appliance) -> None:
    port = app.model_port("od-y")
    outcome: list[httpx.Response] = []
    asker = threading.Thread(target=lambda: outcome.append(ask(app, "od-y")))
    asker.start()
    # Freeze llama-server as soon as it runs (its load cannot finish), check it is loading, then kill it.
    pid = wait_for(lambda: _llama_server_pid(app, "model-od-y"), 30, "od-y's llama-server")
    os.kill(pid, signal.SIGSTOP)
    with contextlib.suppress(httpx.HTTPError):  # not even listening yet: loading too
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code != 200
    assert states(app)["od-y"] == "loading"
    os.kill(pid, signal.SIGKILL)
    asker.join(30)
    assert outcome and outcome[0].status_code == 502, outcome and outcome[0].text
    assert "exited while loading" in outcome[0].json()["error"]["message"]
    # After the backoff, a later request loads it.
    time.sleep(int(outcome[0].headers["retry-after"]))
    wait_for(lambda: ask(app, "od-y").status_code == 200, 60, "od-y to load after the backoff")


def test_a_wait_past_load_timeout_gets_503_naming_what_holds_the_memory(app: Appliance) -> None:
    assert ask(app, "od-x").status_code == 200  # od-x takes the memory, for its whole residency while busy
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            ask(app, "od-x", max_tokens=32)

    busy = [threading.Thread(target=keep_busy) for _ in range(2)]
    for t in busy:
        t.start()
    try:
        t0 = time.monotonic()
        r = ask(app, "od-y")
        waited = time.monotonic() - t0
    finally:
        stop.set()
        for t in busy:
            t.join(60)
    assert r.status_code == 503, r.text
    assert 5 <= waited < 15
    assert r.headers["retry-after"].isdigit()
    message = r.json()["error"]["message"]
    assert "load_timeout_s" in message and "od-x" in message and "CPU" in message
