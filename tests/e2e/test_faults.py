"""Faults with clients in flight, against the real appliance (`appliance up`, llama-server, Gemma 3 270M).

Each fault is injected while clients are talking to the proxy, and each test is bounded in time: what the clients saw
(a complete answer or a clean error, never a hang), what /health and the metrics tell, and that supervisord restores
the service with no process or port left behind.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Appliance, chat_model, serving, start_appliance
from tests.e2e.faults_support import (
    Collector,
    StreamOutcome,
    alive,
    appliance_processes,
    belongs_to,
    children,
    client_ports,
    descendants,
    listeners,
    scrape,
    stream,
    tmpfs,
    wait_for,
)
from tests.helpers import free_port, value

CHAT = "chat"
PROGRAM = f"model-{CHAT}"
# Still generating when the fault strikes (tests that let streams finish lower max_tokens).
LONG = {"model": CHAT, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0.0}
SHORT = {"model": CHAT, "prompt": "The sky is", "max_tokens": 2, "temperature": 0.0}


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    c.set_mode("ok")
    yield c
    c.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, collector: Collector) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("faults")
    # The event log lives in its own directory, where a test mounts a tiny tmpfs; a small batch queue makes a
    # collector that hangs show up as drops within seconds rather than after 20 batches.
    events = {"file": str(tmp / "eventlog" / "events.jsonl"), "url": collector.url, "flush_interval_s": 0.2,
              "batch_size": 20, "queue_size": 60}
    with serving(tmp, [{**chat_model(free_port(), CHAT), "parallel": 4}], {"events": events}) as a:
        yield a


def wait_ready_again(app: Appliance, timeout: float = 90) -> None:
    """Both workers poll on their own: wait until several /health answers in a row say ok."""
    streak = [0]

    def ok() -> bool:
        streak[0] = streak[0] + 1 if httpx.get(app.url + "/health", timeout=5).status_code == 200 else 0
        return streak[0] >= 5

    wait_for(ok, timeout, "the model never became ready again", interval=0.2)
    app.wait_running()


class HealthWatch:
    """Records the model's state from /health every 50 ms in a thread (new connection each time: both workers)."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.states: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                state = httpx.get(self.app.url + "/health", timeout=5).json()["models"][CHAT]["state"]
            except (httpx.HTTPError, ValueError, KeyError):
                state = "?"
            if not self.states or self.states[-1] != state:
                self.states.append(state)
            time.sleep(0.05)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        return self.states


def test_kill_9_of_a_model_during_8_streams(app: Appliance) -> None:
    before = scrape(app)
    errors_before = value(before, "appliance_upstream_errors_total", model=CHAT)
    mid_stream_before = value(before, "appliance_upstream_errors_total", model=CHAT, kind="mid-stream")
    restarts_before = value(before, "appliance_program_restarts_total", program=PROGRAM)
    pid = app.pids()[PROGRAM]
    started = [threading.Event() for _ in range(8)]
    outcomes: list[StreamOutcome] = [StreamOutcome() for _ in range(8)]

    def client(i: int) -> None:
        outcomes[i] = stream(app.url + "/v1/completions", LONG, started[i], timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    # parallel = 4: four streams generate, four wait in llama-server's queue.
    wait_for(lambda: sum(e.is_set() for e in started) >= 4, 60, "the streams never started")
    watch = HealthWatch(app)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(max(1.0, killed + 30 - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a client hangs"
    wait_ready_again(app)
    states = watch.stop()
    summary = [(o.status, o.events, o.done, (o.error or {}).get("code"), o.exception, round(o.ended - killed, 2))
               for o in outcomes]
    print("streams (status, events, done, error, exception, s after the kill):", summary)
    print("/health states:", states)
    assert all(o.clean for o in outcomes), summary
    assert all(o.ended - killed < 10 for o in outcomes), summary
    broken = [o for o in outcomes if o.error is not None]
    assert sum(1 for o in broken if o.status == 200) >= 4, summary  # those generating got an SSE error event
    # The story /health tells: restarting, then ready; never "stopped" (no one stopped it).
    assert "restarting" in states and states[-1] == "ready" and "stopped" not in states, states
    after = scrape(app)
    assert value(after, "appliance_upstream_errors_total", model=CHAT) - errors_before >= len(broken)
    assert value(after, "appliance_upstream_errors_total", model=CHAT, kind="mid-stream") - mid_stream_before >= 4
    assert value(after, "appliance_program_restarts_total", program=PROGRAM) == restarts_before + 1
    assert app.pids()[PROGRAM] != pid
    doc = httpx.get(app.url + "/health", timeout=5).json()
    assert doc["models"][CHAT]["restarts"] >= 1
    assert stream(app.url + "/v1/completions", SHORT).done


@dataclass
class Call:
    thread: int
    ok: bool
    port: int | None  # the client's local port: which connection (hence which worker) carried it
    ended: float
    detail: str = ""


class SequentialClients:
    """``n`` threads, each sending short completions one after another on its own kept-alive connection."""

    def __init__(self, url: str, n: int, body: dict[str, Any] = SHORT) -> None:
        self.url = url
        self.body = body
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        port: int | None = None
        deadline = time.monotonic() + 180
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set() and time.monotonic() < deadline:
                call = self._call(c, i, port)
                port = call.port
                if not call.ok:
                    time.sleep(0.1)
                with self._lock:
                    self.calls.append(call)

    def _call(self, c: httpx.Client, i: int, port: int | None) -> Call:
        try:
            r = c.send(c.build_request("POST", self.url + "/v1/completions", json=self.body), stream=True)
        except httpx.HTTPError as e:
            # Refused, or closed or reset before the response began: attributed to the connection this thread used
            # last (a kept-alive one, when the request went out on it).
            return Call(i, False, port, time.monotonic(), f"no response: {e!r}")
        try:
            # Before the body is read: a response with `Connection: close` closes the socket after it.
            port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
            r.read()
            doc = r.json()
        except (httpx.HTTPError, ValueError) as e:
            return Call(i, False, port, time.monotonic(), f"broken response: {e!r}")
        finally:
            r.close()
        ok = r.status_code == 200 and bool(doc.get("choices"))
        return Call(i, ok, port, time.monotonic(), "200" if ok else f"{r.status_code} {doc['error']['code']}")

    def successes(self, after: float = 0.0) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.ok and c.ended > after)

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.calls


def test_kill_9_of_one_gunicorn_worker_under_load(app: Appliance) -> None:
    arbiter = app.pids()["proxy"]
    workers = sorted(children(arbiter))
    assert len(workers) == 2, workers
    load = SequentialClients(app.url, 6)
    try:
        wait_for(lambda: len({c.thread for c in load.calls if c.ok}) == 6, 60, "not every client got through")
        victim = workers[0]
        on_victim = client_ports(victim, app.doc["server"]["port"])
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # gunicorn notices the dead worker (SIGCHLD) and boots a new one.
        wait_for(lambda: len(children(arbiter) - {victim}) == 2 and not alive(victim), 30, "no replacement worker")
        wait_for(lambda: load.successes(after=killed + 2) >= 12, 60, "the pool does not serve after the kill")
    finally:
        calls = load.stop()
    failed = [c for c in calls if not c.ok]
    print(f"{len(calls)} requests, {len(failed)} failed; the killed worker held client ports {sorted(on_victim)}; "
          f"failures: {[(c.thread, c.port, c.detail, round(c.ended - killed, 2)) for c in failed]}")
    # Only requests on the killed worker's connections may fail, each at most once, and only at the kill.
    assert all(c.port in on_victim for c in failed), failed
    assert all(c.ended - killed < 2 for c in failed), failed
    assert len(failed) <= len(on_victim)
    assert set(children(arbiter)) & set(workers) == {workers[1]}, "the other worker was replaced too"
    assert app.pids()["proxy"] == arbiter


@pytest.mark.parametrize("program", ["proxy", "exporter", "events"])
def test_kill_9_of_a_program_is_restored_without_orphans(app: Appliance, program: str) -> None:
    pid = app.pids()[program]
    tree = {pid} | descendants(pid)
    ports = {"proxy": app.doc["server"]["port"], "exporter": app.doc["metrics"]["port"]}
    load = SequentialClients(app.url, 2)
    try:
        wait_for(lambda: load.successes() >= 2, 60, "no request got through before the kill")
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: app.pids().get(program, pid) != pid, 60, f"supervisord did not restart {program}")
        # NOTE: gunicorn workers orphaned by their arbiter must notice and exit (proxy/worker.py); while they live
        # they keep the port, and the new arbiter cannot bind it.
        wait_for(lambda: not any(alive(p) for p in tree), 15,
                 lambda: f"processes of the killed {program} still run: {[p for p in tree if alive(p)]}")
        app.wait_running(60)
        new = app.pids()[program]
        if program in ports:
            mine = {new} | descendants(new)
            wait_for(lambda: listeners(ports[program]) and listeners(ports[program]) <= mine, 30,
                     lambda: f"port {ports[program]} is held by {listeners(ports[program])}, not by the new "
                             f"{program} {mine}")
        resumed = time.monotonic()
        wait_for(lambda: load.successes(after=resumed) >= 2, 60, "requests do not succeed any more")
    finally:
        load.stop()
        for p in tree:  # orphans this test made must not outlive it (they would hold the port)
            if alive(p) and belongs_to(p, app):
                os.kill(p, signal.SIGKILL)
    if program == "proxy":
        app.wait_health(200, timeout=60)
    assert scrape(app)  # the exporter answers
    if program == "events":
        # The new listener records lifecycle events again.
        assert "exporter: started" in app.supervisorctl("restart", "exporter")
        path = Path(app.doc["events"]["file"])
        wait_for(lambda: any(e.get("program") == "exporter" and e.get("type") == "running" and e["ts"] > killed_at
                             for e in map(json.loads, path.read_text().splitlines())),
                 30, "no lifecycle event after the listener was restarted")


def _p50(app: Appliance, n: int = 20) -> float:
    with httpx.Client(timeout=30) as c:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post(app.url + "/v1/completions", json=SHORT)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return statistics.median(times)


def test_event_log_disk_full_and_collector_down_or_hanging(app: Appliance, collector: Collector) -> None:
    """Requests are served at the same pace, drops are counted per sink, nothing crashes, no torn JSONL line."""
    pids = app.pids()
    baseline = _p50(app)
    sinks = ("file", "http", "queue", "lifecycle")
    dropped = {s: value(scrape(app), "appliance_events_dropped_total", sink=s) for s in sinks}
    path = Path(app.doc["events"]["file"])
    figures: dict[str, float] = {"baseline": baseline}
    try:
        with tmpfs(path.parent, "64k") as d:
            filler = d / "filler"
            with contextlib.suppress(OSError):  # whatever fits: the disk is full
                filler.write_bytes(b"\0" * 65536)
            for mode in ("down", "hang"):
                collector.set_mode(mode)
                figures[mode] = _p50(app)
                time.sleep(1.0)  # a few flush intervals: the events of these requests are written (or dropped)
                # The listener cannot write these lifecycle events either: it counts them and carries on (a crash
                # would give it a new pid).
                assert "exporter: started" in app.supervisorctl("restart", "exporter")
            after = {s: value(scrape(app), "appliance_events_dropped_total", sink=s) for s in dropped}
            filler.unlink()
            collector.set_mode("ok")
            _p50(app, 5)
            wait_for(lambda: path.exists() and path.stat().st_size > 0, 10, "events are not written again")
            time.sleep(0.5)
            lines = path.read_text().splitlines()
            assert all(json.loads(line) for line in lines)  # nothing torn by the full disk
    finally:
        collector.set_mode("ok")
    print(f"p50 (s): {figures}; events dropped: before {dropped}, after {after}")
    for mode in ("down", "hang"):
        assert figures[mode] < 2 * baseline + 0.1, figures
    assert after["file"] - dropped["file"] >= 40, (dropped, after)  # 2 x 20 requests, each an event
    assert after["http"] > dropped["http"], (dropped, after)
    assert after["lifecycle"] - dropped["lifecycle"] >= 4, (dropped, after)  # exporter: stopping ... running, twice
    assert after["queue"] == dropped["queue"]
    assert app.pids() == {**pids, "exporter": app.pids()["exporter"]}  # no proxy, model or listener restart
    assert httpx.get(app.url + "/health", timeout=5).status_code == 200


def test_sigterm_of_the_appliance_with_streams_and_a_sequential_client(tmp_path: Path) -> None:
    """Streams in flight finish; a client sending one request after another on a kept-alive connection gets full
    answers, then `503 draining`, then refused connections; nothing of this appliance keeps running."""
    a = start_appliance(tmp_path, [{**chat_model(free_port(), CHAT), "parallel": 4}],
                   {"server": {"graceful_timeout_s": 30}})
    try:
        a.wait_health(200)
        a.wait_running()
        load = SequentialClients(a.url, 2)
        wait_for(lambda: load.successes() >= 3, 60, "the sequential clients never got through")
        # Three streams leave one of the four slots to the sequential clients: they keep getting answers meanwhile.
        started = [threading.Event() for _ in range(3)]
        outcomes = [StreamOutcome() for _ in range(3)]
        body = {**LONG, "max_tokens": 100}  # a few seconds on the CPU, well within the grace period

        def client(i: int) -> None:
            outcomes[i] = stream(a.url + "/v1/completions", body, started[i], timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: all(e.is_set() for e in started), 60, "the streams never started")
        processes = appliance_processes(a)
        term = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert a.proc.wait(90) == 0
        stopped = time.monotonic()
        calls = load.stop()
    finally:
        a.stop()
    after_term = [c for c in calls if c.ended > term]
    print(f"streams: {[(o.status, o.events, o.done, round(o.ended - term, 2)) for o in outcomes]}; "
          f"stopped after {stopped - term:.1f} s; sequential after SIGTERM: "
          f"{collections.Counter(c.detail.split('(')[0] for c in after_term)}")
    assert all(o.status == 200 and o.done and o.error is None for o in outcomes), outcomes
    assert all(0 < o.ended - term < 30 for o in outcomes)  # in flight at the SIGTERM, finished within the grace
    assert stopped - term < 30  # nothing had to be killed
    # A full answer, a clean 503 draining, or no response at all once the listener closes: refused, or reset when
    # the connection still sat in the accept queue as the last worker closed the socket. A request that got no
    # response never ran (what runs is in flight, and the drain waits for it), so a client may retry it safely.
    allowed = [c for c in after_term if c.ok or c.detail == "503 draining" or c.detail.startswith("no response")]
    assert allowed == after_term, after_term
    assert any(c.detail.startswith("no response: ConnectError") for c in after_term)
    left = [p for p in processes if alive(p)]
    assert not left, left
    log = (Path(a.doc["supervision"]["runtime_dir"]) / "logs" / "proxy.log").read_text()
    assert "Cancel" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_a_stream_that_outlives_the_grace_period_ends_with_an_error_event(tmp_path: Path) -> None:
    """server.graceful_timeout_s bounds a stop: a stream still running then is cut, and like any broken stream it
    must end with an SSE error event, not a truncated chunked body and an "Exception in ASGI application" in the log."""
    a = start_appliance(tmp_path, [chat_model(free_port(), CHAT)], {"server": {"graceful_timeout_s": 2}})
    try:
        a.wait_health(200)
        a.wait_running()
        started = threading.Event()
        outcome = [StreamOutcome()]
        body = {**LONG, "max_tokens": 1500}  # far longer than the 2 s grace
        t = threading.Thread(target=lambda: outcome.__setitem__(0, stream(a.url + "/v1/completions", body, started)))
        t.start()
        wait_for(started.is_set, 60, "the stream never started")
        term = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert a.proc.wait(90) == 0
    finally:
        a.stop()
    o = outcome[0]
    print(f"stream: status {o.status}, {o.events} events, done {o.done}, error {o.error}, exception {o.exception}, "
          f"ended {o.ended - term:.1f} s after the SIGTERM")
    assert o.ended - term < 2 + 5, "the stream outlived gunicorn's graceful_timeout"
    assert o.clean and o.status == 200 and o.error is not None, o
    log = (Path(a.doc["supervision"]["runtime_dir"]) / "logs" / "proxy.log").read_text()
    assert "Exception in ASGI application" not in log, log[-3000:]
