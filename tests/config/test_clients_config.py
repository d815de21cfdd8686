"""[clients.<name>]: the policies parse with their defaults, and check-config refuses each bad one naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.config import UNLIMITED, ClientPolicy, parse
from tests.config.test_config import base_doc, problems, run_check
from tests.helpers import render_toml


def doc_with(tree: Path, clients: dict[str, Any]) -> dict[str, Any]:
    (tree / "keys").write_text("team: sk-team\nbatch-job: sk-batch\neditor.vim: sk-editor\n")
    doc = base_doc(tree)
    doc["server"]["api_keys_file"] = str(tree / "keys")
    doc["models"][0]["aliases"] = ["gpt-4o", "gpt-*"]
    doc["clients"] = clients
    return doc


def test_policies_parse_and_a_key_without_a_section_gets_the_default(tree: Path) -> None:
    cfg = parse(doc_with(tree, {
        "team": {"tokens_per_day": 1_000_000},
        "batch-job": {"max_concurrent": 2, "weight": 0.5},
        "editor.vim": {"models": ["gpt-4o"], "requests_per_minute": 60, "tokens_per_minute": 20000},
        "default": {"requests_per_minute": 10},
    }), tree)
    assert cfg.policy("team") == ClientPolicy(tokens_per_day=1_000_000)
    assert cfg.policy("batch-job") == ClientPolicy(max_concurrent=2, weight=0.5)
    assert cfg.policy("editor.vim").models == ("gpt-4o",) and cfg.policy("editor.vim").limited
    assert cfg.policy("someone-else") == ClientPolicy(requests_per_minute=10)
    assert not cfg.policy("batch-job").limited  # concurrency alone needs no windows


def test_no_sections_mean_no_limits(tree: Path) -> None:
    cfg = parse(doc_with(tree, {}), tree)
    assert cfg.policy("team") is UNLIMITED and UNLIMITED.models is None


def test_each_bad_policy_is_refused_with_its_key(tree: Path) -> None:
    found = problems(tree, doc_with(tree, {
        "nobody": {"max_concurrent": 1},
        "team": {"max_concurrent": -1, "requests_per_minute": 1.5, "tokens_per_day": True, "weight": 0,
                 "models": ["chat", "gpt-4o", "missing"], "burst": 3},
        "batch-job": {"models": "chat"},
        "editor.vim": "all",
    }))
    keys = {p.split(": ", 1)[0] for p in found}
    assert keys == {"clients.nobody", "clients.team.max_concurrent", "clients.team.requests_per_minute",
                    "clients.team.tokens_per_day", "clients.team.weight", "clients.team.models[2]",
                    "clients.team.burst", "clients.batch-job.models", "clients.editor.vim"}, found
    nobody = next(p for p in found if p.startswith("clients.nobody:"))
    assert "no key in" in nobody and "'nobody'" in nobody and "batch-job, editor.vim, team" in nobody
    missing = next(p for p in found if p.startswith("clients.team.models[2]"))
    assert "'missing' is not the name or an alias of a configured model" in missing


def test_without_keys_only_the_default_section_makes_sense(tree: Path) -> None:
    doc = base_doc(tree)
    doc["clients"] = {"default": {"max_concurrent": 4}, "team": {}}
    found = problems(tree, doc)
    assert len(found) == 1 and found[0].startswith("clients.team: no API keys are configured"), found
    del doc["clients"]["team"]
    assert parse(doc, tree).policy("anonymous").max_concurrent == 4


def test_check_config_refuses_a_policy_for_a_name_no_key_has(tree: Path) -> None:
    path = tree / "appliance.toml"
    path.write_text(render_toml(doc_with(tree, {"tem": {"tokens_per_day": 5}})))
    r = run_check(path)
    assert r.returncode == 1 and "clients.tem: no key in" in r.stderr, r.stderr
