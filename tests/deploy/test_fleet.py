"""The fleet: two appliance hosts with different models behind HAProxy on a third host, which also runs the central
Prometheus. node1 serves chat-a and embed, node2 chat-a and chat-b (on demand); the load balancer routes by model.

Real ansible-playbook runs against systemd containers (tests/deploy/lab.py): site.yml and fleet.yml deploy it, then
rolling_upgrade.yml upgrades it under load through the load balancer; a llama-server is killed and a whole host
stopped under load; conversations keep their host; a burst waits in the load balancer's queue; the central Prometheus
gets both hosts' and the load balancer's series from loopback-only exporters and fires alerts.
The tests run in file order and build on each other. Counts and durations are printed (run with -s to see them).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.conftest import _RECAP, ANSIBLE, API_KEY, VENV_BIN, PlayResult, base_vars
from tests.deploy.lab import Lab
from tests.deploy.load import Load, Outcome, summary
from tests.helpers import REPO

with warnings.catch_warnings():  # deprecated, but the only bcrypt in the standard library (Python 3.11)
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

pytestmark = pytest.mark.timeout(1200)

HOSTS = {"node1": "198.18.0.11", "node2": "198.18.0.12", "lb": "198.18.0.10"}
NODES = ["node1", "node2"]
LB_URL = "http://198.18.0.10:8080"
CENTRAL = "http://198.18.0.10:9090"
METRICS_USER, METRICS_PASSWORD = "fleet", "fleet-metrics-test-password"
SERVED_BY = "X-Appliance-Host"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def chat_a() -> dict[str, Any]:
    return {"name": "chat-a", "file": MODEL_FILE, "kind": "chat", "port": 11436, "ctx_size": 1024, "threads": 1,
            "parallel": 2}


def fleet_vars() -> dict[str, Any]:
    v = base_vars("{{ ansible_host }}")  # each host serves on its own lab address
    # Each host its own models (extra vars are the same for every host: the list is chosen by host name).
    v["fleet_models"] = {
        "node1": [chat_a(), {"name": "embed", "file": MODEL_FILE, "kind": "embed", "port": 11437, "ctx_size": 512,
                             "threads": 1, "parallel": 2, "pooling": "mean"}],
        # chat-b is loaded by its first request; its memory is estimated from the GGUF on the host (check-config).
        "node2": [chat_a(), {"name": "chat-b", "aliases": ["claude-*"], "file": MODEL_FILE, "kind": "chat",
                             "port": 11438, "ctx_size": 512, "threads": 1, "parallel": 1, "load": "on_demand",
                             "idle_unload_s": 600}],
    }
    v["appliance_models"] = "{{ fleet_models[inventory_hostname] }}"
    v["appliance_memory"] = {"CPU": 1500}
    hashed = crypt.crypt(METRICS_PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))
    return {
        **v,
        "appliance_lb_bind": [HOSTS["lb"]],
        "appliance_lb_served_by_header": SERVED_BY,
        "appliance_metrics_central_listen_address": HOSTS["lb"],
        "appliance_metrics_central_web_users": {METRICS_USER: hashed},
        "appliance_metrics_central_evaluation_interval_s": 5,
        # The rules' 2 minutes would make the alert test wait that long.
        "appliance_metrics_central_alert_for": {"ApplianceModelDown": "10s", "ApplianceFleetModelUnservable": "10s"},
        "appliance_metrics_agent_remote_write_url": f"{CENTRAL}/api/v1/write",
        "appliance_metrics_agent_remote_write_username": METRICS_USER,
        "appliance_metrics_agent_remote_write_password": METRICS_PASSWORD,
        "appliance_metrics_agent_scrape_interval_s": 5,
        # embed and chat-b have one host each: a rollout takes them out while it upgrades that host.
        "appliance_rolling_allow_unserved": True,
    }


class Fleet:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.inventory = lab.inventory({"gpu_hosts": NODES, "appliance_lb": ["lb"],
                                        "appliance_metrics_central": ["lb"]})
        self.vars = fleet_vars()

    def play(self, *playbooks: str, args: tuple[str, ...] = (), overrides: dict[str, Any] | None = None,
             timeout: float = 900) -> tuple[PlayResult, float]:
        """ansible-playbook with these playbooks (one run); the result and how long it took."""
        extra = self.tmp / "vars.json"
        extra.write_text(json.dumps({**self.vars, **(overrides or {})}))
        env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0"}
        t0 = time.monotonic()
        r = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), *playbooks,
                            "-e", f"@{extra}", *args], cwd=ANSIBLE, env=env, capture_output=True, text=True,
                           timeout=timeout)
        took = time.monotonic() - t0
        out = r.stdout + r.stderr
        changed: dict[str, int] = {}
        for m in _RECAP.findall(out):  # one recap per playbook run: sum them
            changed[m[0]] = changed.get(m[0], 0) + int(m[2])
        return PlayResult(r.returncode, out, changed), took

    def sh(self, host: str, cmd: str, check: bool = True) -> str:
        return self.lab.run(host, cmd, check=check).stdout

    def lb_status(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.sh("lb", "/usr/local/sbin/appliance-lb status --json"))
        return {r["server"]: r for r in rows}

    def wait_lb(self, pred: Callable[[dict[str, dict[str, Any]]], bool], timeout: float, what: str) -> float:
        """Poll the load balancer until pred(status) holds; the time.time() it did."""
        deadline = time.monotonic() + timeout
        status: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            status = self.lb_status()
            if pred(status):
                return time.time()
            time.sleep(0.2)
        raise TimeoutError(f"{what}: {json.dumps(status)}")

    def health(self, host: str) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(f"http://{HOSTS[host]}:8080/health", timeout=5).json()
        return doc

    def program_pid(self, host: str, program: str) -> int:
        for line in self.sh(host, "/usr/local/bin/appliancectl status", check=False).splitlines():
            parts = line.split()
            if parts and parts[0] == program and "pid" in parts:
                return int(parts[parts.index("pid") + 1].rstrip(","))
        raise AssertionError(f"{host}: {program} is not running")

    def central(self, path: str, **params: str) -> Any:
        r = httpx.get(CENTRAL + path, params=params, auth=(METRICS_USER, METRICS_PASSWORD), timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.central("/api/v1/query", query=expr)["result"]
        return result

    def journal_times(self, host: str, tag: str, since: float) -> list[tuple[float, str]]:
        cmd = f"journalctl -t {tag} --since @{int(since)} -o json --no-pager"
        lines = self.sh(host, cmd, check=False).splitlines()
        return [(int(e["__REALTIME_TIMESTAMP"]) / 1e6, str(e.get("MESSAGE", ""))) for e in map(json.loads, lines)]


@pytest.fixture(scope="module")
def lab(lab_image: Path) -> Iterator[Lab]:
    with Lab("fleet", HOSTS) as lb:
        yield lb


@pytest.fixture(scope="module")
def fleet(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    for path in (REPO / ".appliance/bin/llama-server", REPO / f".appliance/models/{MODEL_FILE}"):
        if not path.is_file():
            pytest.fail(f"{path} is missing: run scripts/setup.sh first (the README's command)")
    return Fleet(lab, tmp_path_factory.mktemp("fleet"))


def load(clients: int = 3, kinds: tuple[str, ...] = ("stream", "chat", "embed")) -> Load:
    """chat-a (both hosts) streams and completions, and embed (node1 only) embeddings."""
    return Load(base_url=LB_URL + "/v1", api_key=API_KEY, chat_model="chat-a", embed_model="embed", clients=clients,
                host_header=SERVED_BY.lower(), max_requests=3000, max_seconds=900, kinds=kinds).start()


def chat(model: str, content: str = "Hi", **extra: Any) -> httpx.Response:
    return httpx.post(LB_URL + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": content}],
                            **extra})


def failures(outcomes: list[Outcome]) -> list[str]:
    return [f"{o.kind} at {o.start:.1f}-{o.end:.1f} via {o.host or '?'}: {o.error}" for o in outcomes if not o.ok]


def next_source(tmp: Path, version: str) -> Path:
    """A copy of the checkout's package source with another VERSION: what a new release looks like to Ansible."""
    src = tmp / f"src-{version}"
    if not src.exists():
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / "appliance", src / "appliance", ignore=ignore)
        shutil.copytree(REPO / "systemd", src / "systemd")
        for f in ("pyproject.toml", "setup.py", "README.md"):
            shutil.copy2(REPO / f, src / f)
        (src / "VERSION").write_text(version + "\n")
    return src


def source_version(src: Path) -> str:
    digest = subprocess.run([str(VENV_BIN / "python"), str(ANSIBLE / "roles/appliance/files/source_digest.py"),
                             str(src)], capture_output=True, text=True, check=True).stdout.strip()
    return f"{(src / 'VERSION').read_text().strip()}+src.{digest}"


# --- deploy -----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(2400)  # includes waiting for the lab lock (up to 15 min) and booting the lab
def test_deploy_the_fleet_then_nothing_changes(fleet: Fleet) -> None:
    # --check before anything is configured (Debian's haproxy and prometheus run with their default configs).
    dry, _ = fleet.play("fleet.yml", args=("--check", "--diff"))
    dry.ok()
    first, took = fleet.play("site.yml", "fleet.yml")
    first.ok()
    print(f"\nsite.yml + fleet.yml from nothing: {took:.0f} s")
    again, _ = fleet.play("fleet.yml")
    assert again.ok().changed == {"node1": 0, "node2": 0, "lb": 0}, again.output[-6000:]
    check, _ = fleet.play("fleet.yml", args=("--check", "--diff"))
    assert check.ok().changed == {"node1": 0, "node2": 0, "lb": 0}, check.output[-6000:]
    # A rollout in check mode drains nothing and would change nothing.
    dry, _ = fleet.play("rolling_upgrade.yml", args=("--check", "--diff"))
    assert dry.ok().changed == {"node1": 0, "node2": 0}, dry.output[-6000:]
    # Unless told that it may, a rollout does not take out the only host of a model.
    refused, _ = fleet.play("rolling_upgrade.yml", args=("--check",),
                            overrides={"appliance_rolling_allow_unserved": False})
    assert refused.rc != 0 and "embed would have no host while node1 is upgraded" in refused.output, \
        refused.output[-4000:]
    assert all(s["admin"] == "ready" for s in fleet.lb_status().values())


def test_lb_routes_each_model_to_its_hosts_and_the_appliance_checks_the_keys(fleet: Fleet) -> None:
    fleet.wait_lb(lambda s: all(s[n]["up"] for n in NODES), 60, "both hosts up")
    # HAProxy passes Authorization through; the appliance on the host refuses a request without a key.
    r = httpx.post(LB_URL + "/v1/embeddings", json={"model": "embed", "input": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    headers = {"Authorization": f"Bearer {API_KEY}"}
    served: Counter[str] = Counter()
    for _ in range(6):
        r = httpx.post(LB_URL + "/v1/embeddings", json={"model": "embed", "input": "hello"}, headers=headers,
                       timeout=60)
        assert r.status_code == 200, r.text
        served[r.headers[SERVED_BY]] += 1
    assert served == {"node1": 6}, served
    chat_a_hosts = Counter(chat("chat-a").headers[SERVED_BY] for _ in range(10))
    assert set(chat_a_hosts) == set(NODES), chat_a_hosts
    # An unknown model: 404 from the load balancer itself.
    r = chat("gpt-unknown")
    assert r.status_code == 404 and SERVED_BY not in r.headers, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    models = httpx.get(LB_URL + "/v1/models", headers=headers, timeout=30).json()["data"]
    assert sorted(m["id"] for m in models) == ["chat-a", "chat-b", "embed"], models


def test_an_unloaded_on_demand_model_keeps_its_host_in_and_loads_through_the_load_balancer(fleet: Fleet) -> None:
    fleet.wait_lb(lambda s: all(s[n]["up"] for n in NODES), 60, "both hosts up")
    health = fleet.health("node2")
    assert health["status"] == "ok" and health["models"]["chat-b"]["state"] in ("unloaded", "ready"), health
    assert fleet.lb_status()["node2"]["models"]["chat-b"] == "UP"  # unloaded, it can serve: its request loads it
    # By name and by an alias pattern, only ever on node2.
    for model in ("chat-b", "claude-3-5-haiku-latest", "chat-b"):
        r = chat(model)
        assert r.status_code == 200 and r.headers[SERVED_BY] == "node2", r.text
        assert r.json()["model"] == "chat-b"
    assert fleet.health("node2")["models"]["chat-b"]["state"] == "ready"
    assert all(s["up"] for s in fleet.lb_status().values())  # no host left the load balancer meanwhile
    plan = fleet.sh("node2", "/opt/appliance/venv/bin/appliance check-config /etc/appliance/appliance.toml")
    assert "memory budgets: CPU 1500 MiB" in plan and "chat-b: CPU" in plan and "resident from the start: chat-a" \
        in plan, plan


def test_drain_by_hand_survives_a_reload_and_no_host_gives_a_json_503(fleet: Fleet) -> None:
    lbsh = "/usr/local/sbin/appliance-lb"
    assert ": changed:" in fleet.sh("lb", f"{lbsh} drain node1")
    assert ": unchanged:" in fleet.sh("lb", f"{lbsh} drain node1")
    fleet.sh("lb", "systemctl reload haproxy")
    time.sleep(1)
    assert fleet.lb_status()["node1"]["status"] == "DRAIN"
    fleet.sh("lb", f"{lbsh} drain node2")
    r = httpx.post(LB_URL + "/v1/embeddings", json={"model": "embed", "input": "x"}, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "2", (r.status_code, r.headers)
    assert r.json()["error"]["code"] == "no_host_available"
    for n in NODES:
        fleet.sh("lb", f"{lbsh} ready {n}")
        fleet.sh("lb", f"{lbsh} wait {n} up --timeout 30")


# --- rolling upgrade --------------------------------------------------------------------------------------------


def check_drained_hosts_got_no_new_requests(fleet: Fleet, outcomes: list[Outcome],
                                            since: float) -> dict[str, tuple[float, float]]:
    """Between its drain and its ready (appliance-lb's log on the load balancer), no request started on a host.

    Returns each host's (drained, ready) times; it also checks the hosts took turns."""
    windows: dict[str, tuple[float, float]] = {}
    drains: dict[str, float] = {}
    log = [(t, msg) for t, msg in fleet.journal_times("lb", "appliance-lb", since) if t >= since]
    for t, msg in log:
        host, _, action = msg.partition(": ")
        if action.startswith("drain"):
            drains[host] = t
        elif action.startswith("ready") and host in drains:
            windows[host] = (drains.pop(host), t)
    assert set(windows) == set(NODES), log
    assert windows["node1"][1] <= windows["node2"][0], windows  # one host at a time
    for host, (drained, ready) in windows.items():
        # 1 s of slack: a request HAProxy had already sent when the drain command ran.
        late = [o for o in outcomes if o.host == host and drained + 1 < o.start and o.end < ready]
        assert not late, (host, drained, ready, failures(late) or [(o.kind, o.start) for o in late])
    return windows


def test_rolling_upgrade_under_load_fails_no_request(fleet: Fleet) -> None:
    before = {n: fleet.health(n)["version"] for n in NODES}
    src = next_source(fleet.tmp, "0.1.1")
    new_version = source_version(src)
    # A new release and a model's setting at once: the package restarts the proxy, the setting that model.
    fleet.vars["appliance_source_dir"] = str(src)
    for models in fleet.vars["fleet_models"].values():
        models[0]["ctx_size"] = 768  # chat-a on both hosts
    t_lb = time.time()
    # chat-a only: embed and chat-b live on one host each, and have none while it is upgraded.
    running = load(kinds=("stream", "chat"))
    try:
        running.wait_for(6)
        result, took = fleet.play("rolling_upgrade.yml")
        time.sleep(5)  # the load goes on a little after the last host is back
    finally:
        outcomes = running.stop()
    print(f"\nrolling upgrade {before} -> {new_version}: {took:.0f} s (ansible-playbook); load: {summary(outcomes)}")
    result.ok()
    # The new release's wheels are built before the first drain, not while a host is out of the load balancer.
    built = result.output.index("TASK [appliance : Build the wheelhouse on the controller]")
    assert built < result.output.index("TASK [Drain the host in every load balancer"), result.output[:6000]
    assert "changed: [node1 -> localhost]" in result.output[built:built + 400], result.output[built:built + 400]
    assert not failures(outcomes), failures(outcomes)
    assert not [o for o in outcomes if o.truncated]
    for n in NODES:
        assert fleet.health(n)["version"] == new_version
        assert "ctx_size = 768" in fleet.sh(n, "cat /etc/appliance/appliance.toml")
    windows = check_drained_hosts_got_no_new_requests(fleet, outcomes, t_lb)
    print("drained (s): " + ", ".join(f"{h} {ready - drained:.1f}" for h, (drained, ready) in windows.items()))
    # Requests kept flowing during the whole rollout, through the host that was not drained.
    assert {o.host for o in outcomes if o.ok} == set(NODES)
    assert all(fleet.lb_status()[n]["up"] for n in NODES)


def test_a_host_that_does_not_come_back_stops_the_rollout(fleet: Fleet) -> None:
    broken = fleet.tmp / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 4096)  # a header and nothing else: llama-server cannot load it
    good_models, good_files = fleet.vars["fleet_models"], fleet.vars.get("appliance_models_files")
    files = [{"file": MODEL_FILE, "src": str(REPO / f".appliance/models/{MODEL_FILE}"),
              "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"},
             {"file": "broken.gguf", "src": str(broken), "sha256": hashlib.sha256(broken.read_bytes()).hexdigest()}]
    # memory_mib: the memory plan need not read the file, so the config is valid and the load itself fails.
    broken_model = {"name": "broken", "file": "broken.gguf", "kind": "chat", "port": 11439, "ctx_size": 256,
                    "threads": 1, "parallel": 1, "memory_mib": 300}
    models = {n: [*good_models[n], broken_model] for n in NODES}
    node2_config = fleet.sh("node2", "sha256sum /etc/appliance/appliance.toml")
    running = load(kinds=("stream", "chat"))
    try:
        running.wait_for(3)
        result, took = fleet.play("rolling_upgrade.yml", overrides={
            "fleet_models": models, "appliance_models_files": files, "appliance_health_timeout_s": 30})
    finally:
        outcomes = running.stop()
    print(f"\naborted rollout: {took:.0f} s; load: {summary(outcomes)}")
    assert result.rc != 0
    assert "node1 did not come back healthy" in result.output, result.output[-4000:]
    assert "node2" not in result.changed or result.changed["node2"] == 0, result.changed
    assert fleet.sh("node2", "sha256sum /etc/appliance/appliance.toml") == node2_config
    status = fleet.lb_status()
    assert status["node1"]["drained"] and status["node2"]["up"], status
    assert not failures(outcomes), failures(outcomes)  # node2 served everything
    # The fix is the next rollout with the config that works.
    fleet.vars["fleet_models"], fleet.vars["appliance_models_files"] = good_models, good_files or files[:1]
    fixed, took = fleet.play("rolling_upgrade.yml")
    fixed.ok()
    print(f"rollout that repaired it: {took:.0f} s")
    assert all(fleet.lb_status()[n]["up"] for n in NODES)


# --- failures under load ----------------------------------------------------------------------------------------


def window_report(what: str, outcomes: list[Outcome], t0: float, t1: float) -> list[Outcome]:
    inside = [o for o in outcomes if o.end >= t0 and o.start <= t1]
    print(f"{what}: window {t1 - t0:.1f} s, {summary(inside)}")
    for line in failures(inside):
        print(f"  failed: {line}")
    return inside


def test_kill_9_of_a_llama_server_moves_only_that_models_traffic(fleet: Fleet) -> None:
    fleet.wait_lb(lambda s: all(s[n]["up"] for n in NODES), 60, "both hosts up")
    pid = fleet.program_pid("node1", "model-chat-a")
    running = load()
    try:
        running.wait_for(9)
        t_kill = time.time()
        fleet.sh("node1", f"kill -9 {pid}")
        t_out = fleet.wait_lb(lambda s: s["node1"]["models"]["chat-a"] != "UP", 30, "chat-a on node1 taken out")
        status = fleet.lb_status()["node1"]
        t_back = fleet.wait_lb(lambda s: s["node1"]["up"], 120, "node1 back")
        time.sleep(3)
    finally:
        outcomes = running.stop()
    print(f"\nkill -9 chat-a's llama-server on node1: out of chat-a's backend after {t_out - t_kill:.1f} s, back "
          f"after {t_back - t_kill:.1f} s")
    assert status["models"]["embed"] == "UP", status  # node1 keeps its other model's traffic
    inside = window_report("kill -9 window", outcomes, t_kill, t_back)
    inter = 1.0  # appliance_lb_check_interval_ms; fall 2, and the health follows llama-server within a poll (1 s)
    assert t_out - t_kill < 2 * inter + 3, t_out - t_kill
    assert not [o for o in inside if not o.ok and o.kind != "stream"], failures(inside)
    assert not failures([o for o in outcomes if o not in inside])
    # node1's embeddings went on all along; chat-a's requests that started while it was out went to node2.
    embeds = [o for o in inside if o.kind == "embed"]
    assert embeds and all(o.ok and o.host == "node1" for o in embeds), embeds
    moved = [o for o in inside if o.kind != "embed" and o.ok and t_out + 0.3 < o.start < t_back - 1]
    assert all(o.host == "node2" for o in moved), moved


def test_stopping_a_whole_host_under_load(fleet: Fleet) -> None:
    fleet.wait_lb(lambda s: all(s[n]["up"] for n in NODES), 60, "both hosts up")
    running = load()
    out: list[float] = []

    def watch() -> None:
        out.append(fleet.wait_lb(lambda s: not s["node2"]["up"], 60, "node2 taken out"))

    try:
        running.wait_for(9)
        watcher = threading.Thread(target=watch)
        watcher.start()
        t_stop = time.time()
        fleet.lab.stop("node2")  # a clean poweroff: the appliance drains, then the address is gone
        t_gone = time.time()
        watcher.join(70)
        time.sleep(5)  # node1 alone
        fleet.lab.start("node2")
        t_back = fleet.wait_lb(lambda s: s["node2"]["up"], 240, "node2 back")
        time.sleep(3)
    finally:
        outcomes = running.stop()
    print(f"\nnode2 powered off: out of the load balancer after {out[0] - t_stop:.1f} s (powered off after "
          f"{t_gone - t_stop:.1f} s); booted and back after {t_back - t_stop:.1f} s")
    inside = window_report("host stop window", outcomes, t_stop, t_back)
    assert not [o for o in inside if not o.ok and o.kind != "stream"], failures(inside)
    assert not failures(outcomes), failures(outcomes)  # a clean poweroff lets even the streams finish


# --- conversations and bursts -------------------------------------------------------------------------------------


def test_a_conversation_keeps_its_host_across_turns_and_moves_when_it_drains(fleet: Fleet) -> None:
    fleet.wait_lb(lambda s: all(s[n]["up"] for n in NODES), 60, "both hosts up")
    lbsh = "/usr/local/sbin/appliance-lb"

    def turns(key: str, n: int) -> set[str]:
        hosts = set()
        history = [{"role": "system", "content": f"Conversation {key}."}]
        for i in range(n):
            history.append({"role": "user", "content": f"Turn {i}."})
            r = httpx.post(LB_URL + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": "chat-a", "max_tokens": 2, "messages": history, "prompt_cache_key": key})
            assert r.status_code == 200, r.text
            history.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"] or "."})
            hosts.add(r.headers[SERVED_BY])
        return hosts

    homes = {key: turns(key, 3) for key in (f"conversation-{i}" for i in range(6))}
    assert all(len(h) == 1 for h in homes.values()), homes
    assert set().union(*homes.values()) == set(NODES), homes  # keys spread over both hosts
    key, home = next((k, next(iter(h))) for k, h in homes.items())
    other = next(n for n in NODES if n != home)
    fleet.sh("lb", f"{lbsh} drain {home}")
    try:
        assert turns(key, 3) == {other}
    finally:
        fleet.sh("lb", f"{lbsh} ready {home}")
        fleet.sh("lb", f"{lbsh} wait {home} up --timeout 30")
    assert turns(key, 2) == {home}  # back on its own host once that one is back


def test_a_burst_over_the_fleets_slots_waits_in_the_load_balancer_not_429(fleet: Fleet) -> None:
    fleet.wait_lb(lambda s: all(s[n]["up"] for n in NODES), 60, "both hosts up")
    n = 3 * 2 * 2  # three times chat-a's slots in the fleet: 2 hosts x parallel 2
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda i: chat("chat-a", f"Burst request {i}: count to twenty.", max_tokens=24),
                                range(n)))
    statuses = Counter(r.status_code for r in answers)
    print(f"\nburst of {n}: {dict(statuses)}, served by {dict(Counter(r.headers.get(SERVED_BY) for r in answers))}")
    assert statuses == {200: n}, [r.text for r in answers if r.status_code != 200]
    # The queue shows in the central Prometheus, from the load balancer's own exporter.
    deadline = time.monotonic() + 60
    queued: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not queued:
        queued = [r for r in fleet.query('haproxy_backend_max_queue{model="chat-a", proxy="m_chat-a"}')
                  if float(r["value"][1]) > 0]
        time.sleep(2)
    assert queued and queued[0]["metric"]["instance"] == "lb", queued


# --- fleet metrics ----------------------------------------------------------------------------------------------


def test_exporters_and_agents_listen_on_loopback_only(fleet: Fleet) -> None:
    for n in NODES:
        listening = fleet.sh(n, "ss -Htln | awk '{print $4}'").split()
        for port in ("9464", "9090"):
            binds = {a for a in listening if a.rsplit(":", 1)[1] == port}
            assert binds == {f"127.0.0.1:{port}"}, (n, port, listening)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{HOSTS[n]}:{port}/metrics", timeout=5)


def test_central_prometheus_has_every_host_and_the_dashboard_works_on_it(fleet: Fleet) -> None:
    deadline = time.monotonic() + 90
    hosts: set[str] = set()
    while time.monotonic() < deadline:
        rows = fleet.query("sum by (host, instance) (appliance_requests_total)")
        hosts = {r["metric"]["host"] for r in rows if r["metric"].get("instance") == r["metric"]["host"]}
        if hosts == set(NODES):
            break
        time.sleep(2)
    assert hosts == set(NODES), hosts
    # Without credentials the central side answers nothing.
    assert httpx.get(CENTRAL + "/api/v1/query", params={"query": "up"}, timeout=10).status_code == 401
    # The dashboard's host picker and every panel, on the fleet's data.
    dash = json.loads((REPO / "monitoring/grafana-dashboard.json").read_text())
    picker = next(v for v in dash["templating"]["list"] if v["name"] == "instance")
    assert picker["query"] == "label_values(appliance_model_up, instance)"
    assert set(fleet.central("/api/v1/label/instance/values", **{"match[]": "appliance_model_up"})) == set(NODES)
    # A series reaches the central side a scrape and a remote-write batch after it appears (about 10 s here).
    required = {"Requests per second by status", "Models ready", "In flight", "Restarts"}
    deadline = time.monotonic() + 60
    while True:
        empty = []
        for panel in dash["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$instance", "node1|node2").replace("$__rate_interval", "2m")
                if not fleet.query(expr):
                    empty.append(panel["title"])
        if not required & set(empty) or time.monotonic() > deadline:
            break
        time.sleep(5)
    print(f"\ndashboard panels without data: {empty or 'none'}")
    assert not required & set(empty), empty
    # The rules loaded, with the shorter for: of this test.
    rules = [r for g in fleet.central("/api/v1/rules")["groups"] for r in g["rules"]]
    assert len(rules) == 8 and all(r["health"] == "ok" for r in rules), rules
    assert next(r for r in rules if r["name"] == "ApplianceModelDown")["duration"] == 10
    check = fleet.lab.run("lb", "promtool check rules /etc/prometheus/appliance-alerts.yml", check=False)
    assert check.returncode == 0 and "SUCCESS: 8 rules found" in check.stdout, check.stdout + check.stderr


def test_alerts_fire_when_a_hosts_model_is_down_and_no_host_can_serve_it(fleet: Fleet) -> None:
    # embed lives on node1 only: stopped there, the host's model is down and the fleet cannot serve it at all.
    fleet.sh("node1", "/usr/local/bin/appliancectl stop model-embed")
    t0 = time.time()
    wanted = {("ApplianceModelDown", "embed"), ("ApplianceFleetModelUnservable", "embed")}
    try:
        deadline = time.monotonic() + 120
        firing: dict[tuple[str, str], dict[str, Any]] = {}
        while time.monotonic() < deadline and not wanted <= set(firing):
            # Keyed by model too: another model's alert (chat-b has one host as well) must not stand in for embed's.
            firing = {(a["labels"]["alertname"], a["labels"].get("model", "")): a
                      for a in fleet.central("/api/v1/alerts")["alerts"] if a["state"] == "firing"}
            time.sleep(2)
        print(f"\nfiring {time.time() - t0:.0f} s after the model stopped: {[a['labels'] for a in firing.values()]}")
        others = {k: a for k, a in firing.items() if k not in wanted}
        if others:  # what the load balancer and node2 said then, should another model have had no host
            print(f"other alerts: {others}\nload balancer: {fleet.lb_status()}\nnode2: {fleet.health('node2')}")
        down, unservable = firing[("ApplianceModelDown", "embed")], firing[("ApplianceFleetModelUnservable", "embed")]
        assert (down["labels"]["host"], down["labels"]["instance"]) == ("node1", "node1"), down
        assert "embed on node1" in down["annotations"]["summary"]
        assert unservable["labels"]["instance"] == "lb", unservable
        r = httpx.post(LB_URL + "/v1/embeddings", json={"model": "embed", "input": "x"}, timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_host_available", r.text
    finally:
        fleet.sh("node1", "/usr/local/bin/appliancectl start model-embed", check=False)
    fleet.wait_lb(lambda s: s["node1"]["up"], 120, "node1 back")
