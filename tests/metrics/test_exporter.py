"""One loopback scrape target: proxy metrics summed over workers, children's metrics by model (SPEC §5)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Exporter, Proxy, free_port, samples, stub_config, value, write_config
from tests.stub_llama import StubLlama

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, Exporter, StubLlama, StubLlama]]:
    tmp: Path = tmp_path_factory.mktemp("metrics")
    chat, embed = StubLlama(free_port()), StubLlama(free_port())
    chat.start()
    embed.start()
    doc = stub_config(tmp, chat.port, embed.port, workers=3)
    config = write_config(tmp / "appliance.toml", doc)
    proxy = Proxy(config, doc["server"]["port"]).start()
    exporter = Exporter(config, doc["metrics"]["port"]).start()
    yield proxy, exporter, chat, embed
    exporter.stop()
    proxy.stop()
    chat.stop()
    embed.stop()


def scrape(exporter: Exporter) -> tuple[httpx.Response, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    r = httpx.get(exporter.url + "/metrics", timeout=10)
    assert r.status_code == 200
    return r, samples(r.text)


def worker_pids(proxy: Proxy) -> set[int]:
    assert proxy.proc is not None
    children = Path(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/children").read_text().split()
    return {int(p) for p in children}


def test_counters_add_up_over_workers_and_survive_a_worker_kill(stack: tuple[Proxy, Exporter, StubLlama, StubLlama]
                                                                 ) -> None:
    proxy, exporter, _, _ = stack
    _, before = scrape(exporter)
    base = value(before, "appliance_requests_total", route=CHAT, status="200")
    n = 60
    for _ in range(n):  # a new connection each time, so the kernel spreads them over the workers
        assert httpx.post(proxy.url + CHAT, content=b"{}").status_code == 200
    _, after = scrape(exporter)
    assert value(after, "appliance_requests_total", route=CHAT, status="200") - base == n
    files = {p.name for p in (Path(proxy.config_path.parent) / "run" / "prometheus").iterdir()}
    assert len({f for f in files if f.startswith("counter_")}) >= 2, files

    victim = sorted(worker_pids(proxy))[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (victim in worker_pids(proxy) or len(worker_pids(proxy)) < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim not in worker_pids(proxy) and len(worker_pids(proxy)) == 3
    _, later = scrape(exporter)
    assert value(later, "appliance_requests_total", route=CHAT, status="200") - base == n  # never backwards
    for _ in range(5):
        httpx.post(proxy.url + CHAT, content=b"{}")
    _, last = scrape(exporter)
    assert value(last, "appliance_requests_total", route=CHAT, status="200") - base == n + 5


def test_scrape_is_valid_and_has_every_part(stack: tuple[Proxy, Exporter, StubLlama, StubLlama]) -> None:
    proxy, exporter, _, _ = stack
    httpx.post(proxy.url + CHAT, content=json.dumps({"stub": "stream", "n": 3, "delay": 0.01}).encode())
    httpx.post(proxy.url + CHAT, content=b'{"model": "nope"}')
    r, parsed = scrape(exporter)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    # llama-server's own metrics, labelled with the model
    assert value(parsed, "llamacpp:prompt_tokens_total", model="chat-a") == 12
    assert value(parsed, "llamacpp:prompt_tokens_total", model="embed-a") == 12
    assert value(parsed, "appliance_model_up", model="chat-a") == 1
    assert value(parsed, "appliance_model_ready", model="chat-a") == 1
    # proxy histograms
    assert value(parsed, "appliance_time_to_first_token_seconds_count", model="chat-a") >= 1
    assert value(parsed, "appliance_stream_events_sum", model="chat-a") >= 4
    assert value(parsed, "appliance_response_headers_seconds_count", route=CHAT, model="chat-a") >= 1
    assert value(parsed, "appliance_request_duration_seconds_bucket", route=CHAT, model="chat-a", le="+Inf") >= 1
    assert value(parsed, "appliance_requests_total", route=CHAT, status="404") >= 1
    assert value(parsed, "appliance_request_bytes_total", route=CHAT, model="chat-a") > 0
    assert value(parsed, "appliance_response_bytes_total", route=CHAT, model="chat-a") > 0


def test_in_flight_is_a_live_sum(stack: tuple[Proxy, Exporter, StubLlama, StubLlama]) -> None:
    proxy, exporter, _, _ = stack
    done = threading.Event()

    def stream() -> None:
        body = json.dumps({"stub": "stream", "n": 20, "delay": 0.1}).encode()
        with httpx.stream("POST", proxy.url + CHAT, content=body) as r:
            for _ in r.iter_raw():
                pass
        done.set()

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    assert value(scrape(exporter)[1], "appliance_in_flight", model="chat-a") == 1
    t.join(10)
    assert value(scrape(exporter)[1], "appliance_in_flight", model="chat-a") == 0


def test_upstream_errors_are_counted(stack: tuple[Proxy, Exporter, StubLlama, StubLlama]) -> None:
    proxy, exporter, _, _ = stack
    before = value(scrape(exporter)[1], "appliance_upstream_errors_total", model="chat-a", kind="reset")
    assert httpx.post(proxy.url + CHAT, content=b'{"stub": "reset"}').status_code == 502
    after = value(scrape(exporter)[1], "appliance_upstream_errors_total", model="chat-a", kind="reset")
    assert after == before + 1


def test_metrics_port_is_loopback_only_and_not_on_the_public_port(stack: tuple[Proxy, Exporter, StubLlama, StubLlama]
                                                                   ) -> None:
    proxy, exporter, _, _ = stack
    port = int(exporter.url.rsplit(":", 1)[1])
    # What the kernel says is listening on that port (a wildcard bind would show 0.0.0.0 or ::).
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                listening.add(addr)
    assert listening == {"0100007F"}  # 127.0.0.1, and nothing else
    # Another address of this host (a second loopback address, and any non-loopback one) is refused.
    others = ["127.0.0.2", *_non_loopback_addresses()]
    for addr in others:
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.settimeout(2)
            s.connect((addr, port))
    assert httpx.get(proxy.url + "/metrics").status_code == 404


def _non_loopback_addresses() -> list[str]:
    """This host's own IPv4 addresses other than loopback (from the kernel's local routing table)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False).stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]
    return [a for a in addrs if not a.startswith("127.")]


def test_a_dead_child_gives_up_zero_not_a_failed_scrape(stack: tuple[Proxy, Exporter, StubLlama, StubLlama]) -> None:
    _, exporter, _, embed = stack
    embed.stop()
    _, parsed = scrape(exporter)
    assert value(parsed, "appliance_model_up", model="embed-a") == 0
    assert value(parsed, "appliance_model_up", model="chat-a") == 1
    assert value(parsed, "llamacpp:prompt_tokens_total", model="chat-a") == 12


def test_lifecycle_events_the_listener_dropped_join_the_drop_counter(stack: tuple[Proxy, Exporter, StubLlama, StubLlama]
                                                                     ) -> None:
    proxy, exporter, _, _ = stack
    counters = proxy.config_path.parent / "run" / "restarts.json"  # the listener's counters
    counters.write_text(json.dumps({"supervisord_pid": 1, "counts": {}, "events_dropped": 3}))
    try:
        r, parsed = scrape(exporter)
    finally:
        counters.unlink()
    assert value(parsed, "appliance_events_dropped_total", sink="lifecycle") == 3
    assert r.text.count("# TYPE appliance_events_dropped_total counter") == 1


def test_the_drop_counter_stays_one_family_when_the_proxy_dropped_events_too() -> None:
    from prometheus_client.core import CounterMetricFamily

    from appliance.metrics.exporter import _with_lifecycle_drops

    proxy = CounterMetricFamily("appliance_events_dropped", "Events dropped.", labels=["sink"])
    proxy.add_metric(["file"], 5.0)
    families = list(_with_lifecycle_drops([proxy], 2))
    assert len(families) == 1
    assert {(s.labels["sink"], s.value) for s in families[0].samples} == {("file", 5.0), ("lifecycle", 2.0)}
