"""The appliance role's config template and API keys tasks carry every config key the appliance reads."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from appliance.config import load, read_api_keys
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
