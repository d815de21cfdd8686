"""The load balancer's routing, on loopback: the appliance_lb role's own config (rendered by lb-config.yml) run by the
real HAProxy in front of two real appliance proxies, whose models are stub llama-servers.

node1 serves chat-a and embed, node2 chat-a and chat-b. The container tests (tests/deploy/test_fleet.py) deploy the
same routing with the real model; here each rule is checked fast and in isolation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import REPO, Proxy, free_port, stub_config, write_config
from tests.stub_llama import StubLlama

HOST = "x-appliance-host"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@dataclass
class Fleet:
    url: str
    lb_dir: Path
    stubs: dict[str, StubLlama]  # "<node>/<model>"
    exporter: str

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.lb_dir / "admin.sock"))
            s.sendall(command.encode() + b"\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    def status(self, backend: str, server: str) -> str:
        for line in self.admin("show stat").splitlines():
            f = line.split(",")
            if f[:2] == [backend, server]:
                return f[17]
        raise AssertionError(f"no {backend}/{server}")

    def wait_status(self, backend: str, server: str, want: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.status(backend, server)) != want:
            assert time.monotonic() < deadline, f"{backend}/{server} is {got}, not {want}"
            time.sleep(0.1)

    def post(self, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=headers, timeout=30)

    def hosts_of(self, n: int, path: str, body: dict[str, Any], **headers: str) -> Counter[str]:
        served: Counter[str] = Counter()
        for _ in range(n):
            r = self.post(path, body, **headers)
            assert r.status_code == 200, r.text
            served[r.headers[HOST]] += 1
        return served


def _node(tmp: Path, name: str, models: list[tuple[str, str, list[str]]]) -> tuple[Proxy, dict[str, StubLlama],
                                                                                     list[dict[str, Any]]]:
    stubs = {m: StubLlama(free_port()) for m, _, _ in models}
    for s in stubs.values():
        s.start()
    doc = stub_config(tmp / name, 0, 0, workers=1)
    doc["models"] = [{"name": m, "aliases": aliases, "file": "a.gguf", "kind": kind, "port": stubs[m].port,
                      "parallel": 2, **({"pooling": "mean"} if kind == "embed" else {})}
                     for m, kind, aliases in models]
    (tmp / name).mkdir()
    proxy = Proxy(write_config(tmp / name / "appliance.toml", doc), doc["server"]["port"]).start()
    inventory_models = [{"name": m["name"], "kind": m["kind"], "aliases": m["aliases"], "parallel": 2}
                        for m in doc["models"]]
    return proxy, {f"{name}/{m}": s for m, s in stubs.items()}, inventory_models


def render(tmp: Path, hosts: dict[str, tuple[int, list[dict[str, Any]]]], lb_port: int, exporter_port: int,
           **lb_vars: Any) -> Path:
    """lb-config.yml for these hosts; the directory with the load balancer's config."""
    inventory = {"all": {"children": {
        "gpu_hosts": {"hosts": {h: {"ansible_connection": "local", "appliance_server_bind": ["127.0.0.1"],
                                    "appliance_server_port": port, "appliance_models": models}
                                for h, (port, models) in hosts.items()}},
        "appliance_lb": {"hosts": {"lb": {"ansible_connection": "local", "ansible_python_interpreter":
                                          str(REPO / ".venv/bin/python"), "appliance_lb_bind": ["127.0.0.1"],
                                          "appliance_lb_port": lb_port, "appliance_lb_exporter_port": exporter_port,
                                          "appliance_lb_served_by_header": "X-Appliance-Host",
                                          "appliance_lb_check_interval_ms": 300, "appliance_lb_timeout_queue_s": 20,
                                          **lb_vars}}},
    }}}
    (tmp / "inventory.json").write_text(json.dumps(inventory))
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    r = subprocess.run([str(REPO / ".venv/bin/ansible-playbook"), "-i", str(tmp / "inventory.json"), "lb-config.yml",
                        "-e", f"appliance_lb_config_dir={tmp / 'lb'}"], cwd=REPO / "ansible", env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp / "lb" / "lb"


@dataclass
class Nodes:
    tmp: Path
    hosts: dict[str, tuple[int, list[dict[str, Any]]]]
    stubs: dict[str, StubLlama]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    if not Path(HAPROXY).is_file():
        pytest.fail("haproxy is missing: run scripts/setup.sh --dev (the README's test command)")
    tmp = tmp_path_factory.mktemp("lb")
    node1, stubs1, models1 = _node(tmp, "node1", [("chat-a", "chat", []), ("embed", "embed", ["text-embedding-*"])])
    node2, stubs2, models2 = _node(tmp, "node2", [("chat-a", "chat", []), ("chat-b", "chat", ["claude-*"])])
    try:
        yield Nodes(tmp, {"node1": (node1.port, models1), "node2": (node2.port, models2)}, {**stubs1, **stubs2})
    finally:
        for p in (node1, node2):
            p.stop()
        for s in {**stubs1, **stubs2}.values():
            s.stop()


@contextlib.contextmanager
def load_balancer(nodes: Nodes, name: str, **lb_vars: Any) -> Iterator[Fleet]:
    """HAProxy with the role's config for these nodes, until every model backend has its hosts up."""
    lb_port, exporter_port = free_port(), free_port()
    (nodes.tmp / name).mkdir()
    lb_dir = render(nodes.tmp / name, nodes.hosts, lb_port, exporter_port, **lb_vars)
    with (lb_dir / "haproxy.log").open("wb") as log:
        haproxy = subprocess.Popen([HAPROXY, "-f", str(lb_dir / "haproxy.cfg"), "-db"], stdout=log,
                                   stderr=subprocess.STDOUT)
    f = Fleet(f"http://127.0.0.1:{lb_port}", lb_dir, nodes.stubs, f"http://127.0.0.1:{exporter_port}")
    try:
        deadline = time.monotonic() + 20
        while not (lb_dir / "admin.sock").exists() or any(
                f.status(b, s) != "UP" for b, s in (("m_chat-a", "node1"), ("m_chat-a", "node2"),
                                                    ("m_embed", "node1"), ("m_chat-b", "node2"))):
            assert haproxy.poll() is None, (lb_dir / "haproxy.log").read_text()
            assert time.monotonic() < deadline, (lb_dir / "haproxy.log").read_text()
            time.sleep(0.2)
        yield f
    finally:
        haproxy.terminate()
        haproxy.wait(10)


@pytest.fixture(scope="module")
def fleet(nodes: Nodes) -> Iterator[Fleet]:
    with load_balancer(nodes, "default") as f:
        yield f


def test_each_model_goes_only_to_the_hosts_that_serve_it(fleet: Fleet) -> None:
    assert fleet.hosts_of(6, "/v1/chat/completions", {"model": "chat-b"}) == {"node2": 6}
    assert fleet.hosts_of(4, "/v1/embeddings", {"model": "embed", "input": "x"}) == {"node1": 4}
    assert set(fleet.hosts_of(12, "/v1/chat/completions", {"model": "chat-a"})) == {"node1", "node2"}
    # Aliases and alias patterns route like names.
    assert fleet.hosts_of(2, "/v1/messages", {"model": "claude-3-5-haiku-latest"}) == {"node2": 2}
    assert fleet.hosts_of(2, "/v1/embeddings", {"model": "text-embedding-3-small"}) == {"node1": 2}
    # GET /props?model= as well.
    r = httpx.get(fleet.url + "/props", params={"model": "chat-b"})
    assert r.status_code == 200 and r.headers[HOST] == "node2"


def test_a_model_no_host_serves_gets_404_in_the_clients_shape_from_the_load_balancer(fleet: Fleet) -> None:
    before = sum(len(s.received) for s in fleet.stubs.values())
    r = fleet.post("/v1/chat/completions", {"model": 'gpt-"4"'})
    assert r.status_code == 404 and HOST not in r.headers
    assert r.json()["error"] == {"message": 'The model gpt-"4" is not served by any host of this fleet',
                                 "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    r = fleet.post("/v1/messages", {"model": "mystery", "max_tokens": 1, "messages": []})
    assert r.status_code == 404
    assert r.json() == {"type": "error", "error": {"type": "not_found_error",
                                                   "message": "model: mystery is not served by any host of this fleet"}}
    assert sum(len(s.received) for s in fleet.stubs.values()) == before


def test_requests_without_a_model_go_to_a_host_of_their_kind(fleet: Fleet) -> None:
    assert set(fleet.hosts_of(8, "/v1/chat/completions", {"messages": []})) == {"node1", "node2"}
    assert fleet.hosts_of(3, "/v1/embeddings", {"input": "x"}) == {"node1": 3}


def test_the_model_list_shows_the_fleet_once(fleet: Fleet) -> None:
    spoofed = json.dumps([{"id": "secret-model", "kind": "chat"}])
    for _ in range(4):  # whichever host answers
        r = httpx.get(fleet.url + "/v1/models", headers={"X-Appliance-Fleet-Models": spoofed})
        assert r.status_code == 200
        ids = [m["id"] for m in r.json()["data"]]
        assert sorted(ids) == ["chat-a", "chat-b", "embed"]
        aliases = {m["id"]: m["aliases"] for m in r.json()["data"]}
        assert aliases["chat-b"] == ["claude-*"]


@pytest.mark.parametrize(("body", "headers"), [
    ({"prompt_cache_key": "conversation-1"}, {}),
    ({"user": "alice"}, {}),
    ({"metadata": {"user_id": "bob"}}, {}),
    ({}, {"X-Session-Id": "session-7"}),
])
def test_a_conversation_key_keeps_its_requests_on_one_host(fleet: Fleet, body: dict[str, Any],
                                                           headers: dict[str, str]) -> None:
    served = fleet.hosts_of(8, "/v1/chat/completions", {"model": "chat-a", **body}, **headers)
    assert len(served) == 1, served


def test_keys_spread_over_the_hosts_and_prompt_cache_key_comes_first(fleet: Fleet) -> None:
    hosts = {k: fleet.hosts_of(1, "/v1/chat/completions", {"model": "chat-a", "prompt_cache_key": f"k{k}"})
             for k in range(16)}
    assert {h for c in hosts.values() for h in c} == {"node1", "node2"}
    # With both prompt_cache_key and user, prompt_cache_key decides: the same host as without user.
    for k in range(4):
        with_user = fleet.hosts_of(1, "/v1/chat/completions",
                                   {"model": "chat-a", "prompt_cache_key": f"k{k}", "user": f"u{k * 7}"})
        assert with_user == hosts[k]


def test_a_key_stays_home_while_its_host_has_room(fleet: Fleet) -> None:
    # Two keys of node1. While the first is served there (the fleet's only request in flight), the second still goes
    # home: the bound on affinity must not move a conversation from a host with free slots at light load (each move
    # costs the new host a whole prompt evaluation).
    keys = [k for k in (f"home-{i}" for i in range(40))
            if fleet.hosts_of(1, "/v1/chat/completions", {"model": "chat-a", "user": k}) == {"node1": 1}][:2]
    assert len(keys) == 2, keys
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(fleet.post, "/v1/chat/completions",
                           {"model": "chat-a", "user": keys[0], "stub": "stall", "delay": 1.5})
        time.sleep(0.5)
        assert fleet.hosts_of(1, "/v1/chat/completions", {"model": "chat-a", "user": keys[1]}) == {"node1": 1}
        assert busy.result().headers[HOST] == "node1"


def test_a_model_down_on_one_host_moves_only_that_models_traffic(fleet: Fleet) -> None:
    fleet.stubs["node1/chat-a"].health_status = 503
    try:
        fleet.wait_status("m_chat-a", "node1", "DOWN")
        assert fleet.hosts_of(6, "/v1/chat/completions", {"model": "chat-a"}) == {"node2": 6}
        # A key whose host was node1 moves to node2 and stays there.
        assert fleet.hosts_of(4, "/v1/chat/completions", {"model": "chat-a", "user": "moved"}) == {"node2": 4}
        assert fleet.hosts_of(3, "/v1/embeddings", {"model": "embed", "input": "x"}) == {"node1": 3}
        assert fleet.status("m_embed", "node1") == "UP"
    finally:
        fleet.stubs["node1/chat-a"].health_status = 200
    fleet.wait_status("m_chat-a", "node1", "UP")


def test_drain_takes_a_host_out_of_every_backend_and_keys_move(fleet: Fleet) -> None:
    key_hosts = {k: next(iter(fleet.hosts_of(1, "/v1/chat/completions", {"model": "chat-a", "user": f"d{k}"})))
                 for k in range(8)}
    assert "node1" in key_hosts.values()
    for backend in ("m_chat-a", "m_embed", "hosts"):
        assert fleet.admin(f"set server {backend}/node1 state drain").strip() == ""
    try:
        for backend in ("a_chat-a", "d_chat"):  # tracking servers inherit the drain
            fleet.wait_status(backend, "node1", "DRAIN")
        for k in key_hosts:
            assert fleet.hosts_of(2, "/v1/chat/completions", {"model": "chat-a", "user": f"d{k}"}) == {"node2": 2}
        assert fleet.hosts_of(2, "/v1/chat/completions", {"model": "chat-a"}) == {"node2": 2}
    finally:
        for backend in ("m_chat-a", "m_embed", "hosts"):
            fleet.admin(f"set server {backend}/node1 state ready")
    fleet.wait_status("a_chat-a", "node1", "UP")
    # Back in service, each key returns to its own host.
    for k, host in key_hosts.items():
        assert fleet.hosts_of(1, "/v1/chat/completions", {"model": "chat-a", "user": f"d{k}"}) == {host: 1}


def test_a_burst_over_the_fleets_slots_waits_at_the_load_balancer_instead_of_429(fleet: Fleet) -> None:
    # chat-a: 2 hosts x (parallel 2 + margin 1) = 6 at once; each host itself would refuse beyond 2 + 8.
    n = 36
    body = {"model": "chat-a", "stub": "stall", "delay": 0.6}
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda _: fleet.post("/v1/chat/completions", body), range(n)))
    assert Counter(r.status_code for r in answers) == {200: n}
    metrics = httpx.get(fleet.exporter + "/metrics").text
    max_queue = [line for line in metrics.splitlines()
                 if line.startswith('haproxy_backend_max_queue{proxy="m_chat-a"}')]
    assert max_queue and float(max_queue[0].split()[-1]) >= 6, max_queue  # threads start over some time
    # Never more than parallel + margin at once on a host.
    server_max = [line for line in metrics.splitlines()
                  if line.startswith('haproxy_server_max_sessions{proxy="m_chat-a"')]
    assert server_max and all(float(line.split()[-1]) <= 3 for line in server_max), server_max


def test_the_exporter_listens_on_loopback_only(fleet: Fleet) -> None:
    text = (fleet.lb_dir / "haproxy.cfg").read_text()
    port = fleet.exporter.rsplit(":", 1)[1]
    assert f"bind 127.0.0.1:{port}" in text
    assert httpx.get(fleet.exporter + "/metrics").status_code == 200


def test_without_a_key_the_conversations_beginning_can_be_the_key(nodes: Nodes) -> None:
    with load_balancer(nodes, "conversation", appliance_lb_affinity_conversation=True) as lb:
        homes = []
        for c in range(8):
            history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Topic {c}."}]
            served: Counter[str] = Counter()
            for turn in range(4):  # each turn repeats the beginning and adds to the end
                r = lb.post("/v1/chat/completions", {"model": "chat-a", "messages": history})
                assert r.status_code == 200
                served[r.headers[HOST]] += 1
                history += [{"role": "assistant", "content": "Ok."}, {"role": "user", "content": f"More {turn}."}]
            assert len(served) == 1, served
            homes.append(next(iter(served)))
        assert set(homes) == {"node1", "node2"}, homes
        # Anthropic's system field and a completion prompt's beginning too.
        anthropic = {lb.post("/v1/messages", {"model": "chat-a", "system": "Be brief.", "max_tokens": 1, "messages": [
            {"role": "user", "content": "Same start."}, *[{"role": "user", "content": f"turn {i}"}] * min(i, 1)]}
                             ).headers[HOST] for i in range(4)}
        assert len(anthropic) == 1, anthropic
        prompt = "A long shared document. " * 60
        completions = {lb.post("/v1/completions", {"model": "chat-a", "prompt": prompt + "Q" * i}).headers[HOST]
                       for i in range(4)}
        assert len(completions) == 1, completions


def test_affinity_off_sends_keyed_requests_by_load_and_a_full_queue_times_out_with_503(nodes: Nodes) -> None:
    with load_balancer(nodes, "plain", appliance_lb_affinity=False, appliance_lb_timeout_queue_s=1) as lb:
        text = (lb.lb_dir / "haproxy.cfg").read_text()
        assert "balance hash" not in text and "a_chat-a" not in text
        served = lb.hosts_of(12, "/v1/chat/completions", {"model": "chat-a", "prompt_cache_key": "k"})
        assert set(served) == {"node1", "node2"}, served
        # chat-b: one host, 2 slots + 1 at once; requests that wait over a second get HAProxy's 503.
        body = {"model": "chat-b", "stub": "stall", "delay": 2.5}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: lb.post("/v1/chat/completions", body), range(6)))
        statuses = Counter(r.status_code for r in answers)
        assert statuses == {200: 3, 503: 3}, statuses
        late = next(r for r in answers if r.status_code == 503)
        assert late.headers["retry-after"] == "2"
        assert late.json()["error"]["code"] == "no_host_available"
