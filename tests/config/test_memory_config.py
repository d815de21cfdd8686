"""The on-demand and memory keys: defaults, every bad value refused with its key, and the plan check-config prints."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

from appliance.config import parse
from appliance.runtime.launcher import build_argv
from tests.config.test_config import base_doc, problems, run_check
from tests.e2e.conftest import MODEL_FILE, MODELS
from tests.helpers import render_toml


def models(doc: dict[str, Any], *changes: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(doc)
    for m, change in zip(d["models"], changes, strict=False):
        m.update(change)
    return d


def test_defaults_keep_every_model_loaded_and_count_a_cpu_model_on_cpu(tree: Path) -> None:
    cfg = parse(base_doc(tree), tree)
    chat = cfg.models[0]
    assert (chat.load, chat.on_demand, chat.idle_unload_s, chat.devices, chat.memory_mib) == ("always", False, 0.0,
                                                                                             (), {})
    assert chat.memory_devices == ("CPU",) and chat.gpu_devices == ()
    assert cfg.memory == {} and (cfg.server.load_timeout_s, cfg.server.min_residency_s) == (300.0, 30.0)


def test_bad_on_demand_and_memory_values_are_refused_naming_the_key(tree: Path) -> None:
    doc = models(base_doc(tree),
                 {"load": "lazy", "idle_unload_s": -1, "devices": ["CPU", "CPU", "bad name"]},
                 {"idle_unload_s": 5, "memory_mib": {"CPU": 0}})
    doc["memory"] = {"CPU": "lots", "CUDA0": 1000}
    doc["server"].update(load_timeout_s=0, min_residency_s=-1)
    found = problems(tree, doc)
    for key in ("models[0].load", "models[0].idle_unload_s", "models[0].devices[1]", "models[0].devices[2]",
                "models[1].idle_unload_s", "models[1].memory_mib.CPU", "memory.CPU", "server.load_timeout_s",
                "server.min_residency_s"):
        assert any(p.startswith(key + ":") for p in found), (key, found)


def test_gpu_models_name_their_devices_and_the_launcher_passes_only_gpus(tree: Path) -> None:
    doc = models(base_doc(tree), {"gpu_layers": 99}, {"devices": ["CPU", "Vulkan0"]})
    doc["memory"] = {"CPU": 8000}
    found = problems(tree, doc)
    assert any(p.startswith("models[0].devices:") and "name the devices" in p for p in found), found
    assert any(p.startswith("models[1].devices:") and "gpu_layers = 0" in p for p in found), found
    assert any(p.startswith("models[1].devices[1]:") and "Vulkan0 has no budget" in p for p in found), found
    assert any("--device" in p and "models[].devices" in p for p in problems(
        tree, models(base_doc(tree), {"extra_args": ["--device", "CUDA0"]})))
    one_number = models(base_doc(tree), {"gpu_layers": 99, "devices": ["CPU", "CUDA0"], "memory_mib": 900})
    assert any(p.startswith("models[0].memory_mib:") and "table per device" in p for p in problems(tree, one_number))

    ok = models(base_doc(tree), {"gpu_layers": 99, "devices": ["CPU", "Vulkan0"],
                                 "memory_mib": {"CPU": 300, "Vulkan0": 900}})
    ok["memory"] = {"CPU": 8000, "Vulkan0": 4000}
    cfg = parse(ok, tree)
    argv = build_argv(cfg, cfg.models[0])
    assert argv[argv.index("--device") + 1] == "Vulkan0"  # CPU is host memory, never a llama.cpp device
    assert "--device" not in build_argv(cfg, cfg.models[1])


def real_model_tree(tree: Path) -> dict[str, Any]:
    """base_doc over the real default model, so that its footprint is estimated from the file."""
    target = tree / "models" / MODEL_FILE
    try:
        os.link((MODELS / MODEL_FILE).resolve(), target)
    except OSError:
        shutil.copyfile(MODELS / MODEL_FILE, target)
    return models(base_doc(tree), {"file": MODEL_FILE}, {"file": MODEL_FILE})


def test_check_config_prints_the_plan_and_refuses_one_that_cannot_work(tree: Path) -> None:
    doc = real_model_tree(tree)
    doc["memory"] = {"CPU": 1000}
    doc["models"].append({"name": "coder", "file": MODEL_FILE, "port": 11438, "load": "on_demand",
                          "idle_unload_s": 600})
    path = tree / "a.toml"
    path.write_text(render_toml(doc))
    r = run_check(path)
    assert r.returncode == 0, r.stderr
    assert "memory budgets: CPU 1000 MiB" in r.stdout
    assert "coder: CPU" in r.stdout and "on demand, unloaded after 600 s idle" in r.stdout
    assert "weights 235 MiB" in r.stdout  # estimated from the GGUF
    assert "resident from the start: chat, emb" in r.stdout

    doc["memory"] = {"CPU": 600}  # the two always models need more than that together
    path.write_text(render_toml(doc))
    r = run_check(path)
    assert r.returncode == 1
    assert "memory.CPU: the always-loaded models need" in r.stderr and "chat " in r.stderr and "emb " in r.stderr

    doc["memory"] = {"CPU": 200}  # no model fits even alone
    doc["models"][1]["load"] = "on_demand"
    path.write_text(render_toml(doc))
    r = run_check(path)
    assert r.returncode == 1
    assert "models[2]: coder needs" in r.stderr and "more than its whole budget of 200 MiB" in r.stderr

    doc["models"][2]["memory_mib"] = 150  # the operator's figure wins over the estimate
    doc["models"][0]["memory_mib"] = 150
    doc["models"][1]["memory_mib"] = 150
    path.write_text(render_toml(doc))
    assert run_check(path).returncode == 0


def test_an_unreadable_model_file_is_refused_only_when_memory_is_planned(tree: Path) -> None:
    doc = base_doc(tree)  # m.gguf is not a GGUF file
    path = tree / "a.toml"
    path.write_text(render_toml(doc))
    r = run_check(path)
    assert r.returncode == 0 and "no estimate" in r.stdout
    doc["memory"] = {"CPU": 4000}
    path.write_text(render_toml(doc))
    r = run_check(path)
    assert r.returncode == 1 and "models[0].file: cannot read" in r.stderr and "set memory_mib" in r.stderr


def test_alias_patterns_are_checked(tree: Path) -> None:
    doc = models(base_doc(tree), {"name": "gpt-*"}, {"aliases": ["*", "text-embedding-[23", "text-embedding-*"]})
    found = problems(tree, doc)
    assert any(p.startswith("models[0].name:") and "cannot be a pattern" in p for p in found), found
    assert any(p.startswith("models[1].aliases[0]:") and "matches every name" in p for p in found), found
    assert any(p.startswith("models[1].aliases[1]:") and "unbalanced" in p for p in found), found
    assert not any(p.startswith("models[1].aliases[2]") for p in found), found
