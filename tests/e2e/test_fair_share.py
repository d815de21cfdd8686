"""Fair sharing of a busy model's slots, with the real llama-server and model behind two proxy workers: a client that
floods the model delays another client's one request by about one generation, not by the whole flood."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Appliance, chat_model, serving
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(240)

KEYS = {"flood": "sk-flood", "single": "sk-single", "heavy": "sk-heavy"}
FLOOD = 12


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("fair")
    (tmp / "keys").write_text("".join(f"{n}: {k}\n" for n, k in KEYS.items()))
    model = {**chat_model(free_port(), "chat"), "parallel": 1, "max_queue": 40}
    with serving(tmp, [model], {"server": {"api_keys_file": str(tmp / "keys")},
                                "clients": {"heavy": {"weight": 3}}}) as app:
        yield app


def ask(app: Appliance, client: str, tokens: int = 16) -> float:
    r = httpx.post(app.url + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEYS[client]}"},
                   json={"model": "chat", "max_tokens": tokens, "messages": [{"role": "user", "content": "Count."}]})
    assert r.status_code == 200, r.text
    return time.monotonic()


def metrics(app: Appliance) -> str:
    return httpx.get(f"http://127.0.0.1:{app.doc['metrics']['port']}/metrics", timeout=10).text


def waiting(app: Appliance) -> float:
    found = re.search(r'^appliance_queue_waiting\{model="chat"\} (\S+)$', metrics(app), re.M)
    assert found, "appliance_queue_waiting is not exported"
    return float(found[1])


def test_one_request_waits_about_one_generation_behind_a_flood(app: Appliance) -> None:
    with ThreadPoolExecutor(FLOOD + 1) as pool:
        flood = [pool.submit(ask, app, "flood", 40) for _ in range(FLOOD)]
        time.sleep(1.5)  # the flood is in: one runs, the rest wait in the proxy
        queued = waiting(app)
        sent = time.monotonic()
        single_done = pool.submit(ask, app, "single", 40).result()
        ends = [f.result() for f in flood]
    assert queued >= FLOOD - 4, queued
    # llama-server alone serves first come, first served: every request of the flood still waiting would go first.
    ahead = sum(sent < end < single_done for end in ends)
    assert ahead <= 2, (queued, ahead, sorted(round(e - single_done, 2) for e in ends))
    events = [json.loads(line) for line in
              (Path(app.doc["supervision"]["runtime_dir"]) / "events.jsonl").read_text().splitlines()]
    waited = [e for e in events if e.get("event") == "request" and e.get("client") == "single"]
    assert waited and waited[-1]["queue_wait_ms"] > 0, waited
    assert 'appliance_queue_wait_seconds_count{model="chat"}' in metrics(app)


def test_a_client_that_leaves_the_queue_frees_its_place(app: Appliance) -> None:
    done = threading.Event()

    def hold() -> None:
        while not done.is_set():
            ask(app, "heavy", tokens=32)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        time.sleep(0.5)
        with httpx.Client(timeout=1) as c, pytest.raises(httpx.ReadTimeout):
            c.post(app.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['single']}"},
                   json={"model": "chat", "max_tokens": 64, "messages": [{"role": "user", "content": "Wait."}]})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and waiting(app) != 0:
            time.sleep(0.2)
        assert waiting(app) == 0
    finally:
        done.set()
        holder.join(60)
