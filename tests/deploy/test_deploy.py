"""site.yml against a real systemd host: refusals, deploy, idempotence, the deployed host, reloads, stop and crash.

The tests run in file order and build on each other (one host, deployed once): the fresh host (none of the roles'
packages) and preflight refusals on it first, then the deploy, then changes to it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from typing import Any

import httpx
import openai
import pytest
import testinfra

from appliance.config.load import key_label
from tests.deploy.conftest import API_KEY, Deployment
from tests.deploy.lab import MIRRORED
from tests.helpers import REPO

pytestmark = pytest.mark.timeout(900)


def host(d: Deployment) -> Any:
    return testinfra.get_host(f"ssh://{d.lab.address(d.hosts[0])}", ssh_config=str(d.lab.ssh_config()))


def nothing_installed(d: Deployment) -> None:
    out = d.sh("id appliance 2>&1; ls /opt/appliance /etc/appliance /etc/systemd/system/appliance.service 2>&1",
               check=False)
    assert "no such user" in out and out.count("No such file or directory") == 3, out


def test_the_host_starts_without_any_package_the_roles_install(deployment: Deployment) -> None:
    h = host(deployment)
    assert [p for p in MIRRORED if h.package(p).is_installed] == []
    assert "libgomp.so.1" not in h.run("ldconfig -p").stdout


@pytest.mark.parametrize(("overrides", "message"), [
    ({"appliance_server_bind": ["0.0.0.0"]}, "node1: appliance_server_bind: 0.0.0.0 listens on every interface"),
    ({"appliance_server_bind": ["198.18.0.99"]},
     "node1: appliance_server_bind: 198.18.0.99 is not an address of this host"),
    ({"appliance_api_keys": []}, "node1: appliance_server_bind: 198.18.0.11 is reachable from the network"),
])
def test_preflight_refuses_before_changing_anything(deployment: Deployment, overrides: dict[str, Any],
                                                    message: str) -> None:
    r = deployment.play(overrides=overrides)
    assert r.rc != 0
    assert message in r.output, r.output[-4000:]
    assert r.changed == {"node1": 0}, r.changed
    nothing_installed(deployment)


def test_deploy_from_nothing_then_nothing_changes(deployment: Deployment) -> None:
    first = deployment.play().ok()
    assert first.changed["node1"] > 5
    again = deployment.play().ok()
    assert again.changed == {"node1": 0}, again.output[-6000:]
    check = deployment.play("--check", "--diff").ok()
    assert check.changed == {"node1": 0}, check.output[-6000:]


def test_files_users_and_modes(deployment: Deployment) -> None:
    h = host(deployment)
    user = h.user("appliance")
    assert user.exists and user.group == "appliance" and user.shell in ("/usr/sbin/nologin", "/bin/false")
    for path, owner, group, mode in (
        ("/etc/appliance/appliance.toml", "root", "appliance", 0o640),
        ("/etc/appliance/api_keys", "root", "appliance", 0o640),
        ("/opt/appliance/bin/llama-server", "root", "root", 0o755),
        ("/opt/appliance/models/gemma-3-270m-q4_k_m.gguf", "root", "root", 0o644),
        ("/var/log/appliance", "appliance", "appliance", 0o750),
        ("/run/appliance", "appliance", "appliance", 0o750),
    ):
        f = h.file(path)
        assert f.exists, path
        assert (f.user, f.group, f.mode) == (owner, group, mode), path
    assert h.file("/etc/appliance/api_keys").contains(API_KEY)
    version = (REPO / "VERSION").read_text().strip()
    installed = h.run("/opt/appliance/venv/bin/appliance --version").stdout.split()
    assert installed[0] == "appliance" and installed[1].startswith(version + "+src."), installed
    assert h.run("/opt/appliance/venv/bin/appliance check-config /etc/appliance/appliance.toml").rc == 0


def test_llama_server_finds_every_shared_library_it_links(deployment: Deployment) -> None:
    # The role installed the Debian packages of the binary's NEEDED libraries (libgomp1 for the CPU build).
    ldd = host(deployment).run("ldd /opt/appliance/bin/llama-server")
    assert ldd.rc == 0 and "not found" not in ldd.stdout, ldd.stdout + ldd.stderr


def test_service_and_every_program_running(deployment: Deployment) -> None:
    h = host(deployment)
    svc = h.service("appliance")
    assert svc.is_enabled and svc.is_running
    for program in ("model-gemma", "proxy", "exporter", "events"):
        p = h.supervisor(program, "/opt/appliance/venv/bin/supervisorctl", "/run/appliance/supervisord.conf")
        assert p.is_running, program
    users = {ln.split()[0] for ln in h.run("ps -eo user:20,comm --no-headers").stdout.splitlines()
             if ln.split()[1] in ("llama-server", "supervisord", "gunicorn", "python")}
    assert users == {"appliance"}, users
    # The drop-in's bounds on a stop and on a reload: graceful_timeout_s (30) + 90 s.
    assert sorted(deployment.sh("systemctl show -p TimeoutStopUSec -p TimeoutStartUSec appliance").split()) == \
        ["TimeoutStartUSec=2min", "TimeoutStopUSec=2min"]


def test_an_operator_sees_the_host_at_a_glance_without_root(deployment: Deployment) -> None:
    deployment.sh("id ops >/dev/null 2>&1 || useradd --no-create-home --shell /bin/sh ops")
    deployment.play(overrides={"appliance_operators": ["ops"]}).ok()
    assert "appliance" in deployment.sh("id -nG ops").split()
    doc = json.loads(deployment.sh("runuser -u ops -- /usr/local/bin/appliance-status --json"))
    assert doc["healthy"] and doc["health"] == "ok", doc
    assert {m["name"]: m["state"] for m in doc["models"]} == {"gemma": "ready"}
    assert {p["name"] for p in doc["programs"]} >= {"proxy", "exporter", "events"}
    plain = deployment.sh("runuser -u ops -- /usr/local/bin/appliance-status")
    assert "gemma" in plain and "healthy" in plain
    # Without the group, the supervisord socket stays closed to other users.
    deployment.sh("id nobody")
    other = deployment.sh("runuser -u nobody -- /usr/local/bin/appliance-status; echo rc=$?", check=False)
    assert "rc=1" in other, other


def test_client_policies_apply_and_an_operator_reads_the_usage_ledger(deployment: Deployment) -> None:
    client = key_label(API_KEY)  # the name of a bare key
    deployment.vars["appliance_clients"] = {client: {"models": ["gemma"], "requests_per_minute": 100000}}
    deployment.play(overrides={"appliance_operators": ["ops"]}).ok()
    out = openai.OpenAI(base_url=deployment.url() + "/v1", api_key=API_KEY, max_retries=0, timeout=120
                        ).completions.with_raw_response.create(model="gemma", prompt="Hi", max_tokens=2)
    assert out.headers["x-ratelimit-limit-requests"] == "100000"
    assert deployment.sh("stat -c '%U:%G %a' /var/lib/appliance /var/lib/appliance/usage.sqlite3").split() == \
        ["appliance:appliance", "750", "appliance:appliance", "640"]
    deadline = time.monotonic() + 10  # written about once a second
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not rows:
        rows = json.loads(deployment.sh("runuser -u ops -- /opt/appliance/venv/bin/appliance usage --config "
                                        "/etc/appliance/appliance.toml --by client --format json"))
        time.sleep(0.5)
    assert rows and rows[0]["client"] == client and rows[0]["requests"] >= 1, rows


def test_listening_sockets_public_port_on_lan_address_only(deployment: Deployment) -> None:
    sockets = set(host(deployment).socket.get_listening_sockets())
    tcp = {s for s in sockets if s.startswith("tcp")}
    assert "tcp://198.18.0.11:8080" in tcp
    assert "tcp://127.0.0.1:9464" in tcp and "tcp://127.0.0.1:11436" in tcp
    for port in ("8080", "9464", "11436"):
        binds = {s for s in tcp if s.endswith(f":{port}")}
        assert len(binds) == 1, binds  # no wildcard or second address next to the intended one


def test_lan_client_gets_the_api_but_not_metrics_or_models(deployment: Deployment) -> None:
    url = deployment.url()
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    out = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=8)
    assert out.choices[0].text and out.model == "gemma"
    for port in (9464, 11436):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://198.18.0.11:{port}/metrics", timeout=5)
    # The exporter answers on the host's loopback.
    assert "appliance_requests_total" in deployment.sh("curl -sf 127.0.0.1:9464/metrics")


def test_unit_verifies_and_its_exposure_is_low(deployment: Deployment) -> None:
    verify = deployment.lab.run("node1", "systemd-analyze verify /etc/systemd/system/appliance.service", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = deployment.sh("systemd-analyze security --no-pager appliance.service")
    score = float(re.search(r"Overall exposure level for appliance.service: ([\d.]+)", report)[1])  # type: ignore[index]
    print(f"\nsystemd-analyze security appliance.service: {score}")
    assert score <= 3.0, report


def stream_completion(url: str, tokens: int) -> tuple[float, float, bytes]:
    started = time.time()
    body = {"model": "gemma", "prompt": "Once upon a time", "max_tokens": tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        data = b"".join(r.iter_raw())
    return started, time.time(), data


def journal_time(d: Deployment, message: str) -> float:
    """When the unit's journal last logged ``message`` (Unix time; the containers share the kernel's clock)."""
    lines = d.sh("journalctl -u appliance -o json --no-pager").splitlines()
    times = [int(e["__REALTIME_TIMESTAMP"]) / 1e6 for e in map(json.loads, lines)
             if message in str(e.get("MESSAGE", ""))]
    assert times, f"no {message!r} in the journal"
    return times[-1]


def test_server_change_reloads_proxy_workers_only_with_streams_in_flight(deployment: Deployment) -> None:
    before = deployment.pids()
    old_workers = set(deployment.sh(f"pgrep -P {before['proxy']}").split())
    streams: list[tuple[float, float, bytes]] = []
    done = threading.Event()

    def back_to_back() -> None:
        for _ in range(60):  # bounded: each stream takes seconds
            if done.is_set():
                return
            streams.append(stream_completion(deployment.url(), 300))

    t = threading.Thread(target=back_to_back)
    t.start()
    try:
        deployment.vars["appliance_server_workers"] = 3
        r = deployment.play().ok()
        assert r.changed["node1"] >= 1
    finally:
        done.set()
        t.join(300)
    reloaded = journal_time(deployment, "Reloaded")
    # ExecReload (in a user namespace of its own) saw the old workers stop accepting before it returned.
    switched = journal_time(deployment,
                            "reload: replaced the proxy workers (in-flight requests finish on the old ones)")
    assert switched <= reloaded
    assert all(s[2].endswith(b"data: [DONE]\n\n") for s in streams), [s[2][-200:] for s in streams]
    assert any(start < reloaded < end for start, end, _ in streams), (reloaded, [s[:2] for s in streams])
    after = deployment.pids()
    assert after == before, (before, after)  # supervisord, the arbiter and every model kept their PIDs
    deadline = time.monotonic() + 40  # the old workers exit once their last connection is gone
    while len(workers := deployment.sh(f"pgrep -P {after['proxy']}").split()) != 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(workers) == 3 and not old_workers & set(workers), (old_workers, workers)


def test_adding_a_model_starts_only_it(deployment: Deployment) -> None:
    before = deployment.pids()
    deployment.vars["appliance_models"] = [*deployment.vars["appliance_models"],
                                           {"name": "second", "file": "gemma-3-270m-q4_k_m.gguf", "kind": "chat",
                                            "port": 11437, "ctx_size": 512, "threads": 1, "parallel": 1}]
    deployment.play().ok()
    deployment.wait_running()
    after = deployment.pids()
    assert "model-second" in after
    assert {k: after[k] for k in before if k not in ("exporter", "events")} == \
        {k: v for k, v in before.items() if k not in ("exporter", "events")}
    doc = deployment.wait_health()
    assert set(doc["models"]) == {"gemma", "second"}


def test_changing_one_model_restarts_only_it(deployment: Deployment) -> None:
    before = deployment.pids()
    deployment.vars["appliance_models"][1]["ctx_size"] = 768
    deployment.play().ok()
    deployment.wait_running()
    after = deployment.pids()
    assert after["model-second"] != before["model-second"]
    assert {k: v for k, v in after.items() if k != "model-second"} == \
        {k: v for k, v in before.items() if k != "model-second"}
    deployment.wait_health()


def test_a_model_that_cannot_load_fails_the_play_with_its_state(deployment: Deployment) -> None:
    broken = deployment.tmp / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(range(256)) * 4096)  # a GGUF magic, then garbage: llama-server exits
    gemma = REPO / ".appliance/models/gemma-3-270m-q4_k_m.gguf"
    files = [{"file": gemma.name, "src": str(gemma), "sha256": hashlib.sha256(gemma.read_bytes()).hexdigest()},
             {"file": broken.name, "src": str(broken), "sha256": hashlib.sha256(broken.read_bytes()).hexdigest()}]
    models = [*deployment.vars["appliance_models"],
              {"name": "broken", "file": broken.name, "kind": "chat", "port": 11438, "threads": 1}]
    r = deployment.play(overrides={"appliance_models_files": files, "appliance_models": models,
                                   "appliance_health_timeout_s": 20})
    assert r.rc != 0
    assert re.search(r"node1: the appliance did not become healthy within 20 s .*HTTP 503", r.output), r.output[-3000:]
    assert re.search(r"Model broken: (loading|restarting|failed) since", r.output), r.output[-3000:]
    assert "Model gemma:" not in r.output and "Model second:" not in r.output  # only the failing model is named
    # Taking it out again heals the host; the other models kept serving all along.
    deployment.play().ok()
    assert set(deployment.wait_health()["models"]) == {"gemma", "second"}


def test_systemctl_stop_lets_a_stream_finish_and_leaves_nothing(deployment: Deployment) -> None:
    result: list[tuple[float, float, bytes]] = []
    t = threading.Thread(target=lambda: result.append(stream_completion(deployment.url(), 300)))
    t.start()
    time.sleep(1.5)  # the stream is under way
    deployment.sh("systemctl stop appliance")
    t.join(120)
    assert result and result[0][2].endswith(b"data: [DONE]\n\n"), result
    assert deployment.sh("pgrep -u appliance", check=False).strip() == ""
    assert deployment.sh("systemctl is-active appliance", check=False).strip() == "inactive"
    deployment.sh("systemctl start appliance")
    deployment.wait_health()
    deployment.wait_running()


def ledger(d: Deployment) -> tuple[str, int]:
    """The usage ledger's integrity check and its count of requests."""
    script = ("import sqlite3; c = sqlite3.connect('/var/lib/appliance/usage.sqlite3'); print(c.execute('pragma "
              "integrity_check').fetchone()[0], c.execute('select sum(requests) from usage').fetchone()[0])")
    out = d.sh(f'runuser -u appliance -- /opt/appliance/venv/bin/python -c "{script}"').split()
    return out[0], int(out[1])


def test_kill_9_of_supervisord_restarts_the_unit_and_the_models(deployment: Deployment) -> None:
    deployment.wait_running()
    _, requests_before = ledger(deployment)
    before = deployment.pids()
    deployment.sh(f"kill -9 {before['supervisord']}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        main = deployment.sh("systemctl show -p MainPID --value appliance").strip()
        if main not in ("0", str(before["supervisord"])):
            break
        time.sleep(0.5)
    doc = deployment.wait_health()
    assert all(m["state"] == "ready" for m in doc["models"].values())
    deployment.wait_running()
    after = deployment.pids()
    # The usage ledger came through: the file is whole, and what was written before is there.
    check, requests = ledger(deployment)
    assert check == "ok" and requests >= requests_before > 0, (check, requests, requests_before)
    assert after["supervisord"] != before["supervisord"]
    assert after["model-gemma"] != before["model-gemma"]
    # No orphan of the killed supervisord survived next to the new one.
    llamas = deployment.sh("pgrep -x llama-server").split()
    assert sorted(map(int, llamas)) == sorted([after["model-gemma"], after["model-second"]])
