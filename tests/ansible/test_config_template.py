"""The appliance role's config template and API keys tasks carry every config key the appliance reads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import ConfigError, load, read_api_keys
from tests.ansible.test_tls_templates import ANSIBLE, ROLES, render

KEYS_TASKS = ("Check the API keys and the events token fit their files", "Write the API keys file")


def test_new_server_and_model_keys_reach_the_config(tmp_path: Path) -> None:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    host = {**local, "appliance_server_cors_allow_origins": ["https://chat.example.lan"],
            "appliance_server_max_header_bytes": 16384, "appliance_server_header_timeout_s": 5,
            "appliance_models": [
                {"name": "chat", "file": "m.gguf", "port": 11436, "chat_template": "gemma", "max_queue": 3},
                {"name": "rank", "file": "m.gguf", "port": 11437, "kind": "rerank"}]}
    out = render(tmp_path, {"all": {"children": {"gpu_hosts": {"hosts": {"h": host}}, "appliance_lb": {}}}})
    cfg = load(out / "h.toml", check_files=False)
    assert cfg.server.cors_allow_origins == ("https://chat.example.lan",)
    assert (cfg.server.max_header_bytes, cfg.server.header_timeout_s, cfg.server.max_headers) == (16384, 5.0, 100)
    chat, rank = cfg.models
    assert (chat.chat_template, chat.max_queue, chat.queue_limit) == ("gemma", 3, 5)
    assert (rank.kind, rank.max_queue) == ("rerank", None)


def test_on_demand_keys_and_memory_budgets_reach_the_config(tmp_path: Path) -> None:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    host = {**local, "appliance_memory": {"CPU": 16384, "CUDA0": 24000}, "appliance_server_load_timeout_s": 90,
            "appliance_server_min_residency_s": 12,
            "appliance_models": [
                {"name": "big", "file": "m.gguf", "port": 11436, "load": "on_demand", "idle_unload_s": 600,
                 "gpu_layers": 99, "devices": ["CPU", "CUDA0"], "memory_mib": {"CPU": 600, "CUDA0": 9000}},
                {"name": "small", "file": "m.gguf", "port": 11437, "memory_mib": 800}]}
    out = render(tmp_path, {"all": {"children": {"gpu_hosts": {"hosts": {"h": host}}, "appliance_lb": {}}}})
    cfg = load(out / "h.toml", check_files=False)
    assert cfg.memory == {"CPU": 16384, "CUDA0": 24000}
    assert (cfg.server.load_timeout_s, cfg.server.min_residency_s) == (90.0, 12.0)
    big, small = cfg.models
    assert (big.load, big.idle_unload_s, big.devices, big.gpu_devices) == ("on_demand", 600.0, ("CPU", "CUDA0"),
                                                                           ("CUDA0",))
    assert big.memory_mib == {"CPU": 600, "CUDA0": 9000}
    assert (small.load, small.memory_mib, small.memory_devices) == ("always", {"CPU": 800}, ("CPU",))


def test_the_preflight_refuses_a_memory_plan_the_inventory_shows_cannot_work() -> None:
    path = ANSIBLE / "filter_plugins" / "appliance_memory.py"
    spec = importlib.util.spec_from_file_location("appliance_memory", path)
    assert spec is not None and spec.loader is not None
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    appliance_memory_problems = plugin.appliance_memory_problems
    models = [{"name": "a", "memory_mib": 700}, {"name": "b", "memory_mib": 700},
              {"name": "c", "load": "on_demand", "gpu_layers": 10, "devices": ["CUDA1"]}]
    problems = appliance_memory_problems(models, {"CPU": 1000})
    assert problems == ["c: device CUDA1 has no budget in appliance_memory",
                        "the always-loaded models need 1400 MiB of CPU, more than its budget of 1000 MiB"]
    assert appliance_memory_problems(models[:1], {"CPU": 1000}) == []
    assert appliance_memory_problems(models, {}) == []


def run_keys_tasks(tmp: Path, keys: list[Any]) -> subprocess.CompletedProcess[str]:
    """The role's own tasks (preflight check, then the file), run on the controller alone."""
    tasks = [t for f in ("preflight.yml", "configure.yml")
             for t in yaml.safe_load((ROLES / "appliance" / "tasks" / f).read_text()) if t["name"] in KEYS_TASKS]
    assert len(tasks) == len(KEYS_TASKS)
    for t in tasks:
        t.pop("notify", None)
        if "ansible.builtin.copy" in t:
            t["ansible.builtin.copy"].update(owner=None, group=None)
    variables = {"appliance_api_keys": keys, "appliance_events_token": "",
                 "appliance_server_api_keys_file": str(tmp / "api_keys")}
    play = [{"name": "keys", "hosts": "localhost", "gather_facts": False, "vars": variables, "tasks": tasks}]
    (tmp / "keys.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    return subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
                           str(tmp / "keys.yml")], capture_output=True, text=True, cwd=ANSIBLE, timeout=240,
                          env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PYTHON_INTERPRETER": sys.executable})


def test_named_and_bare_keys_make_a_keys_file_the_proxy_reads(tmp_path: Path) -> None:
    r = run_keys_tasks(tmp_path, [{"name": "alice", "key": "sk-alice"}, "sk-bare"])
    assert r.returncode == 0, r.stdout + r.stderr
    keys = read_api_keys(tmp_path / "api_keys")
    assert keys["sk-alice"] == "alice" and keys["sk-bare"].startswith("key-")


def test_malformed_keys_fail_the_preflight_without_showing_them(tmp_path: Path) -> None:
    for bad in ([{"name": "has space", "key": "sk-1"}], [{"name": "bob"}], ["two words"], [{"name": "c", "key": "#x"}]):
        r = run_keys_tasks(tmp_path, bad)
        assert r.returncode != 0, bad
        assert "appliance_api_keys: each item is a key or {name, key}" in r.stdout, r.stdout
        assert "sk-1" not in r.stdout and "two words" not in r.stdout
        assert not (tmp_path / "api_keys").exists()


def test_client_policies_and_the_state_dir_reach_the_config(tmp_path: Path) -> None:
    keys_file = tmp_path / "api_keys"
    keys_file.write_text("team-a.bot: sk-team\nalice: sk-alice\n")
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    host = {**local, "appliance_server_api_keys_file": str(keys_file),
            "appliance_api_keys": [{"name": "team-a.bot", "key": "sk-team"}, {"name": "alice", "key": "sk-alice"}],
            "appliance_supervision_state_dir": "/var/lib/appliance/ledger",
            "appliance_models": [{"name": "chat", "file": "m.gguf", "port": 11436, "aliases": ["gpt-4o"]},
                                 {"name": "embed", "file": "e.gguf", "port": 11437, "kind": "embed"}],
            "appliance_clients": {
                "team-a.bot": {"models": ["gpt-4o", "embed"], "max_concurrent": 2, "requests_per_minute": 30,
                               "tokens_per_minute": 1000, "tokens_per_day": 50000, "weight": 2.5},
                "alice": {"weight": 3, "models": None},
                "default": {"models": ["chat"], "max_concurrent": 1}}}
    out = render(tmp_path, {"all": {"children": {"gpu_hosts": {"hosts": {"h": host}}, "appliance_lb": {}}}})
    text = (out / "h.toml").read_text()
    assert '[clients."team-a.bot"]' in text
    cfg = load(out / "h.toml", check_files=False)
    assert cfg.supervision.state_dir == "/var/lib/appliance/ledger"
    assert set(cfg.clients) == {"team-a.bot", "alice", "default"}
    team = cfg.clients["team-a.bot"]
    assert team.models == ("gpt-4o", "embed")
    assert (team.max_concurrent, team.requests_per_minute, team.tokens_per_minute, team.tokens_per_day) == (
        2, 30, 1000, 50000)
    assert isinstance(team.weight, float) and team.weight == 2.5
    alice = cfg.clients["alice"]
    assert (alice.models, alice.weight, alice.max_concurrent, alice.tokens_per_day) == (None, 3.0, 0, 0)
    assert cfg.clients["default"].models == ("chat",) and cfg.clients["default"].max_concurrent == 1
    assert cfg.policy("someone-else") is cfg.clients["default"]


def test_no_client_policies_render_no_clients_table_and_the_default_state_dir(tmp_path: Path) -> None:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    out = render(tmp_path, {"all": {"children": {"gpu_hosts": {"hosts": {"h": local}}, "appliance_lb": {}}}})
    assert "[clients" not in (out / "h.toml").read_text()
    cfg = load(out / "h.toml", check_files=False)
    assert cfg.clients == {}
    assert cfg.supervision.state_dir == "/var/lib/appliance"


def test_check_config_refuses_a_policy_for_a_name_no_key_has(tmp_path: Path) -> None:
    """What the role's validate step (check-config on the rendered file) stops before the config is installed."""
    keys_file = tmp_path / "api_keys"
    keys_file.write_text("alice: sk-alice\n")
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    host = {**local, "appliance_server_api_keys_file": str(keys_file),
            "appliance_api_keys": [{"name": "alice", "key": "sk-alice"}],
            "appliance_clients": {"bob": {"max_concurrent": 1}, "alice": {"tokens_per_day": "lots"}}}
    out = render(tmp_path, {"all": {"children": {"gpu_hosts": {"hosts": {"h": host}}, "appliance_lb": {}}}})
    with pytest.raises(ConfigError) as err:
        load(out / "h.toml", check_files=False)
    text = str(err.value)
    assert "clients.bob" in text and "no key in" in text, text
    assert "clients.alice.tokens_per_day" in text and "'lots'" in text, text


def run_preflight_task(tmp: Path, name: str, variables: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """One preflight task with the role's defaults and vars, run on the controller alone."""
    tasks = [t for t in yaml.safe_load((ROLES / "appliance" / "tasks" / "preflight.yml").read_text())
             if t["name"] == name]
    assert len(tasks) == 1
    role_vars = {**yaml.safe_load((ROLES / "appliance" / "defaults" / "main.yml").read_text()),
                 **yaml.safe_load((ROLES / "appliance" / "vars" / "main.yml").read_text()), **variables}
    play = [{"name": "preflight", "hosts": "localhost", "gather_facts": False, "vars": role_vars, "tasks": tasks}]
    (tmp / "preflight.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    return subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
                           str(tmp / "preflight.yml")], capture_output=True, text=True, cwd=ANSIBLE, timeout=240,
                          env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PYTHON_INTERPRETER": sys.executable})


CLIENTS_TASK = "Check the client policies name API keys, known keys and configured models"


def test_the_preflight_refuses_client_policies_for_unknown_names_keys_and_models(tmp_path: Path) -> None:
    keys = [{"name": "alice", "key": "sk-alice"}, "sk-bare"]
    bare = "key-" + hashlib.sha256(b"sk-bare").hexdigest()[:8]
    models = [{"name": "chat", "file": "m.gguf", "port": 11436, "aliases": ["gpt-4o"]}]
    good = {"alice": {"models": ["gpt-4o", "chat"], "weight": 2}, bare: {}, "default": {"max_concurrent": 1}}
    r = run_preflight_task(tmp_path, CLIENTS_TASK, {"appliance_api_keys": keys, "appliance_models": models,
                                                    "appliance_clients": good})
    assert r.returncode == 0, r.stdout + r.stderr
    for bad in ({"bob": {}}, {"alice": {"tokens_per_hour": 5}}, {"alice": {"models": ["embed"]}},
                {"alice": {"models": "chat"}}, {"alice": 5}):
        r = run_preflight_task(tmp_path, CLIENTS_TASK, {"appliance_api_keys": keys, "appliance_models": models,
                                                        "appliance_clients": bad})
        assert r.returncode != 0, bad
        assert "appliance_clients: each entry is a dict named after an API key" in r.stdout, r.stdout
        assert "sk-alice" not in r.stdout and "sk-bare" not in r.stdout
    r = run_preflight_task(tmp_path, CLIENTS_TASK, {"appliance_api_keys": [], "appliance_models": models,
                                                    "appliance_clients": {"alice": {}}})
    assert r.returncode != 0 and "Unknown names now: alice." in r.stdout, r.stdout


def test_the_preflight_keeps_the_state_dir_under_the_units_state_directory(tmp_path: Path) -> None:
    task = "Check the paths fit the systemd unit"
    for ok in ("/var/lib/appliance", "/var/lib/appliance/ledger/"):
        r = run_preflight_task(tmp_path, task, {"appliance_supervision_state_dir": ok})
        assert r.returncode == 0, r.stdout + r.stderr
    for bad in ("/srv/appliance", "/var/lib/appliance/../other", "state", "/var/log/appliance"):
        r = run_preflight_task(tmp_path, task, {"appliance_supervision_state_dir": bad})
        assert r.returncode != 0, bad
        assert "must be /var/lib/appliance (the unit's StateDirectory) or lie under it" in r.stdout, r.stdout


def test_the_role_creates_the_state_dir_for_the_service_and_nothing_in_it(tmp_path: Path) -> None:
    play = [{"name": "dirs", "hosts": "localhost", "gather_facts": False,
             "vars_files": [str(ROLES / "appliance" / f / "main.yml") for f in ("defaults", "vars")],
             "tasks": [{"name": "Show", "ansible.builtin.copy": {
                 "content": "{{ __appliance_directories | to_json }}", "dest": str(tmp_path / "dirs.json"),
                 "mode": "0644"}}]}]
    (tmp_path / "dirs.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    service = {"owner": "appliance", "group": "appliance", "mode": "0750"}
    for state_dir, extra in (("/var/lib/appliance", []), ("/var/lib/appliance/ledger/", ["/var/lib/appliance/ledger"])):
        r = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
                            "-e", f"appliance_supervision_state_dir={state_dir}", str(tmp_path / "dirs.yml")],
                           capture_output=True, text=True, cwd=ANSIBLE, timeout=240,
                           env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PYTHON_INTERPRETER": sys.executable})
        assert r.returncode == 0, r.stdout + r.stderr
        dirs = json.loads((tmp_path / "dirs.json").read_text())
        state = [d for d in dirs if d["path"].startswith("/var/lib/appliance")]
        assert state == [{"path": p, **service} for p in ["/var/lib/appliance", *extra]]
    # Only the directory: no task or handler of the role names the ledger file.
    tasks = "".join(f.read_text() for d in ("tasks", "handlers") for f in (ROLES / "appliance" / d).glob("*.yml"))
    assert "usage.sqlite3" not in tasks
