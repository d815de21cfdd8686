"""Request events: one per request, the right fields, no text; sinks that never slow a request (SPEC §5)."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from appliance.events.sink import append_jsonl
from tests.helpers import Proxy, free_port, stub_config, write_config
from tests.stub_llama import StubLlama

CHAT = "/v1/chat/completions"


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_events(path: Path, pred: Any, timeout: float = 5) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in read_events(path) if pred(e)]
        if found:
            return found
        time.sleep(0.05)
    return []


class Collector:
    """A real HTTP collector that records the batches it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.batches: list[tuple[str, list[dict[str, Any]]]] = []

    def start(self) -> None:
        import asyncio

        ready = threading.Event()

        async def handle(request: web.Request) -> web.Response:
            self.batches.append((request.headers.get("Authorization", ""), await request.json()))
            return web.Response(status=204)

        def run() -> None:
            loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/events", handle)
            runner = web.AppRunner(app)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)


@pytest.fixture(scope="module")
def collector() -> Collector:
    c = Collector()
    c.start()
    return c


@pytest.fixture(scope="module")
def events_proxy(stubs: tuple[StubLlama, StubLlama], collector: Collector, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("events")
    (tmp / "token").write_text("collector-secret\n")
    doc = stub_config(tmp, stubs[0].port, stubs[1].port)
    doc["events"] = {"url": f"http://127.0.0.1:{collector.port}/events", "token_file": str(tmp / "token"),
                     "flush_interval_s": 0.1}
    p = Proxy(write_config(tmp / "appliance.toml", doc), doc["server"]["port"]).start()
    yield p
    p.stop()


def test_one_event_per_request_with_the_right_fields(events_proxy: Proxy, chat_stub: StubLlama) -> None:
    secret = "the prompt text must never be logged 7f3a"
    r = httpx.post(events_proxy.url + CHAT, json={"model": "gpt-4o-mini",
                                                  "messages": [{"role": "user", "content": secret}]})
    rid = r.headers["x-request-id"]
    path = events_proxy.config_path.parent / "run" / "events.jsonl"
    assert wait_events(path, lambda e: e.get("request_id") == rid)
    time.sleep(0.3)  # a duplicate would have been written by now
    found = [e for e in read_events(path) if e.get("request_id") == rid]
    assert len(found) == 1
    ev = found[0]
    assert ev["event"] == "request" and ev["route"] == CHAT and ev["model"] == "chat-a" and ev["status"] == 200
    assert ev["stream"] is False
    assert 0 < ev["headers_ms"] <= ev["total_ms"] < 10_000
    assert ev["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text = path.read_text()
    assert secret not in text and "h\\u00e9llo" not in text and "héllo" not in text


def test_stream_and_error_events(events_proxy: Proxy, chat_stub: StubLlama) -> None:
    body = json.dumps({"stub": "stream", "n": 3, "delay": 0.05}).encode()
    rid_stream = httpx.post(events_proxy.url + CHAT, content=body).headers["x-request-id"]
    rid_404 = httpx.post(events_proxy.url + CHAT, json={"model": "missing"}).headers["x-request-id"]
    path = events_proxy.config_path.parent / "run" / "events.jsonl"
    (stream_ev,) = wait_events(path, lambda e: e.get("request_id") == rid_stream)
    assert stream_ev["stream"] is True and stream_ev["first_token_ms"] <= stream_ev["total_ms"]
    (err_ev,) = wait_events(path, lambda e: e.get("request_id") == rid_404)
    assert err_ev["status"] == 404 and err_ev["model"] is None


def test_collector_receives_batches_with_the_bearer_token(events_proxy: Proxy, collector: Collector) -> None:
    rid = httpx.post(events_proxy.url + CHAT, content=b"{}").headers["x-request-id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        hits = [(auth, e) for auth, batch in collector.batches for e in batch if e.get("request_id") == rid]
        if hits:
            break
        time.sleep(0.05)
    assert hits and hits[0][0] == "Bearer collector-secret"


def _latencies(url: str, n: int) -> list[float]:
    out = []
    with httpx.Client() as c:
        for _ in range(n):
            t = time.perf_counter()
            assert c.post(url + CHAT, content=b"{}").status_code == 200
            out.append(time.perf_counter() - t)
    return out


def test_a_dead_collector_delays_no_request_and_drops_are_counted(
        proxy: Proxy, stubs: tuple[StubLlama, StubLlama], tmp_path: Path) -> None:
    doc = stub_config(tmp_path, stubs[0].port, stubs[1].port, workers=1)
    # Nothing listens there; a tiny queue makes the drops happen within the test.
    doc["events"] = {"url": f"http://127.0.0.1:{free_port()}/events", "queue_size": 4, "batch_size": 2,
                     "flush_interval_s": 0.05}
    down = Proxy(write_config(tmp_path / "appliance.toml", doc), doc["server"]["port"]).start()
    try:
        with_down = _latencies(down.url, 150)
        baseline = _latencies(proxy.url, 150)
        # Generous: a request that waited on the collector would take seconds (3 tries with backoff).
        assert statistics.median(with_down) < statistics.median(baseline) * 5 + 0.05
        assert max(with_down) < 2.0
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path / "run" / "prometheus"))
        time.sleep(0.5)
        dropped = registry.get_sample_value("appliance_events_dropped_total", {"sink": "http"}) or 0.0
        dropped += registry.get_sample_value("appliance_events_dropped_total", {"sink": "queue"}) or 0.0
        assert dropped > 0
        # The local file still has every request.
        assert len(wait_events(tmp_path / "run" / "events.jsonl", lambda e: e["event"] == "request")) >= 140
    finally:
        down.stop()


def test_jsonl_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    for i in range(200):
        append_jsonl(path, [{"i": i, "pad": "x" * 50}], max_bytes=1000, backups=2)
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 1000
        lines = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert lines
    assert read_events(path)[-1]["i"] == 199
    # Order across files: .2 is the oldest
    assert read_events(tmp_path / "events.jsonl.2")[0]["i"] < read_events(tmp_path / "events.jsonl.1")[0]["i"]
