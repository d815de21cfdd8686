"""The model manager's decisions, fast: a fake supervisord, the real shared counters, no llama-server.

The real-model tests (tests/e2e/test_on_demand*.py) prove the whole; these pin the policy's corners down.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load
from appliance.lifecycle import plan
from appliance.lifecycle.manager import Manager, Waiter, log_reason
from appliance.shared import hostload
from appliance.shared.modelstate import CLOSING, FAILED, LOADING, READY, UNLOADED
from tests.helpers import stub_config, write_config


class FakeSupervisor:
    """supervisord as the manager sees it: programs that start at once and stop when asked."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.exited: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def infos(self) -> dict[str, dict[str, Any]]:
        out = {p: {"name": p, "statename": "EXITED", "exitstatus": 1} for p in self.exited}
        return out | {p: {"name": p, "statename": "RUNNING"} for p in self.running}

    async def rpc(self, method: str, program: str, *args: Any) -> None:
        self.calls.append((method, program))
        if method == "startProcess":
            self.running.add(program)
            self.exited.discard(program)
        elif method == "stopProcess":
            self.running.discard(program)


def manager(tmp: Path, residency: float = 30.0, budget: int = 500) -> tuple[Manager, FakeSupervisor, hostload.HostLoad]:
    doc = stub_config(tmp, 9001, 9002, min_residency_s=residency, load_timeout_s=5)
    doc["models"] = [
        {"name": n, "file": "a.gguf", "port": 9100 + i, "load": "on_demand", "memory_mib": 400, "parallel": 1,
         "max_queue": 1}
        for i, n in enumerate(("a", "b", "c"))]
    doc["memory"] = {"CPU": budget}
    cfg = load(write_config(tmp / "appliance.toml", doc), check_files=False)
    hostload.reset(hostload.load_dir(cfg))
    workers = hostload.HostLoad(hostload.load_dir(cfg), ("a", "b", "c"))
    workers.start()
    m = Manager(cfg, plan.footprints(cfg))
    sup = FakeSupervisor()
    m._rpc = sup.rpc  # type: ignore[method-assign]
    return m, sup, workers


async def step(m: Manager, sup: FakeSupervisor, ready: frozenset[str] | set[str] = frozenset()) -> None:
    """One tick; the models in ``ready`` answer /health 200; the supervisord calls it makes are let run."""
    await m.tick(sup.infos(), {name: 200 for name in ready})
    await asyncio.sleep(0)
    await asyncio.gather(*m._tasks)


def ask(m: Manager, name: str) -> asyncio.Future[dict[str, Any]]:
    waiter = Waiter(asyncio.get_running_loop().create_future(), time.monotonic())
    m._add_waiter(m.runs[name], waiter)
    return waiter.future


def test_waiting_models_load_in_arrival_order_and_a_busy_one_is_never_closed(tmp_path: Path) -> None:
    async def scenario() -> None:
        m, sup, workers = manager(tmp_path)
        first = ask(m, "a")
        await step(m, sup)
        assert m.runs["a"].state == LOADING and sup.calls == [("startProcess", "model-a")]
        await step(m, sup, {"a"})
        assert first.result() == {"ok": True} and m.runs["a"].state == READY
        assert workers.try_enter("a", 10)  # a request for a in flight
        second, third = ask(m, "b"), ask(m, "c")
        m.runs["a"].loaded_at -= 60  # past its residency: only its request in flight keeps it
        for _ in range(3):
            await step(m, sup)
        assert m.runs["a"].state == CLOSING and "model-a" in sup.running  # closing, not stopped under the request
        assert not second.done() and not third.done()
        workers.leave("a")
        await asyncio.sleep(0.06)  # CLOSE_GRACE_S
        await step(m, sup)
        await step(m, sup)
        assert m.runs["a"].state == UNLOADED and m.runs["a"].unloads == {"evicted": 1}
        assert m.runs["b"].state == LOADING and m.runs["c"].state == UNLOADED  # b asked first
        await step(m, sup, {"b"})
        assert second.result() == {"ok": True} and not third.done()

    asyncio.run(scenario())


def test_within_its_residency_a_model_in_use_keeps_its_memory(tmp_path: Path) -> None:
    async def scenario() -> None:
        m, sup, workers = manager(tmp_path, residency=30)
        ask(m, "a")
        await step(m, sup)
        await step(m, sup, {"a"})
        assert workers.try_enter("a", 10)
        waiting = ask(m, "b")
        for _ in range(5):
            await step(m, sup)
        assert m.runs["a"].state == READY and not waiting.done()
        workers.leave("a")
        m.runs["a"].last_use -= 2  # idle for longer than IDLE_S: it may go within its residency
        await step(m, sup)
        assert m.runs["a"].state == CLOSING and m.runs["a"].closing_reason == "evicted"

    asyncio.run(scenario())


def test_waiting_requests_are_bounded_per_model(tmp_path: Path) -> None:
    async def scenario() -> None:
        m, _, _ = manager(tmp_path)
        futures = [ask(m, "a") for _ in range(3)]  # parallel 1 + max_queue 1: two may wait
        assert futures[2].result()["status"] == 429 and not futures[0].done()

    asyncio.run(scenario())


def test_a_failed_load_answers_at_once_and_is_retried_only_after_the_backoff(tmp_path: Path) -> None:
    async def scenario() -> None:
        m, sup, _ = manager(tmp_path)
        log = m.cfg.log_dir / "model-a.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        waiting = ask(m, "a")
        await step(m, sup)
        log.write_text("llama_model_load: error loading model: failed to read /opt/x/a.gguf: bad magic\n")
        sup.running.discard("model-a")  # it exited while loading
        sup.exited.add("model-a")
        m.runs["a"].load_started -= 2
        await step(m, sup)
        answer = waiting.result()
        assert answer["status"] == 502 and answer["code"] == "model_load_failed"
        assert "bad magic" in answer["message"] and "/opt" not in answer["message"]
        assert m.runs["a"].state == FAILED and answer["retry_after"] >= 1
        starts = sup.calls.count(("startProcess", "model-a"))
        again = ask(m, "a")  # within the backoff: the same reason, nothing started
        assert again.result()["status"] == 503 and sup.calls.count(("startProcess", "model-a")) == starts
        m.runs["a"].retry_at = time.monotonic() - 1
        ask(m, "a")
        await step(m, sup)
        assert sup.calls.count(("startProcess", "model-a")) == starts + 1

    asyncio.run(scenario())


def test_a_wait_past_load_timeout_names_what_holds_the_memory(tmp_path: Path) -> None:
    async def scenario() -> None:
        m, sup, workers = manager(tmp_path)
        ask(m, "a")
        await step(m, sup)
        await step(m, sup, {"a"})
        assert workers.try_enter("a", 10)
        waiting = ask(m, "b")
        m.runs["b"].waiters[0].since -= 10  # past load_timeout_s (5)
        await step(m, sup)
        answer = waiting.result()
        assert answer["status"] == 503 and answer["retry_after"] > 0
        assert "load_timeout_s" in answer["message"] and "a (CPU 400 MiB, 1 in flight)" in answer["message"]

    asyncio.run(scenario())


@pytest.mark.parametrize(("log", "want"), [
    ("main: loading\ngguf_init_from_file_impl: invalid magic characters: 'xxxx'\nllama_model_load: error loading "
     "model: llama_model_loader: failed to load model from /srv/models/x.gguf\nmain: exiting due to model loading "
     "error\n", "gguf_init_from_file_impl: invalid magic characters: 'xxxx'; llama_model_load: error loading model: "
     "llama_model_loader: failed to load model from <file>"),
    ("all good\n", ""),
])
def test_the_reason_of_a_failed_load_comes_from_the_log_without_paths(log: str, want: str) -> None:
    assert log_reason(log) == want
