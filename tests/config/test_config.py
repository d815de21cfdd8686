"""Every validation rule of SPEC §3/§4, and `appliance check-config` as Ansible's validate: would run it."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, check_bind_address, load, parse, read_api_keys
from appliance.config.args import check_extra_args
from tests.helpers import REPO, render_toml


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    (tmp_path / "bin").mkdir()
    binary = tmp_path / "bin" / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "keys").write_text("sk-1\n")
    return tmp_path


def base_doc(tree: Path) -> dict[str, Any]:
    return {
        "server": {"bind": ["127.0.0.1"], "port": 8080},
        "metrics": {"port": 9464},
        "llama_server": {"binary": str(tree / "bin" / "llama-server"),
                         "allowed_binary_prefixes": [str(tree / "bin")], "models_dir": str(tree / "models")},
        "models": [{"name": "chat", "file": "m.gguf", "port": 11436},
                   {"name": "emb", "file": "m.gguf", "kind": "embed", "port": 11437}],
    }


def problems(tree: Path, doc: dict[str, Any]) -> list[str]:
    try:
        parse(doc, tree)
    except ConfigError as e:
        return e.problems
    return []


def with_(doc: dict[str, Any], section: str, **values: Any) -> dict[str, Any]:
    d = copy.deepcopy(doc)
    d.setdefault(section, {}).update(values)
    return d


def test_valid_config_parses_with_documented_defaults(tree: Path) -> None:
    cfg = parse(base_doc(tree), tree)
    assert cfg.server.body_limit_bytes == 32 * 1024 * 1024
    assert cfg.server.request_timeout_s == 120.0
    assert cfg.models[0].kind == "chat" and cfg.models[1].pooling == "mean"
    assert cfg.models[0].file == str(tree / "models" / "m.gguf")
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("addr", ["0.0.0.0", "::", "::ffff:0.0.0.0", "255.255.255.255", "224.0.0.1", "ff02::1",
                                  "::ffff:224.0.0.1", "::ffff:255.255.255.255", "0000:0000::", "localhost",
                                  "10.0.0.300"])
def test_refused_bind_addresses(addr: str) -> None:
    assert check_bind_address(addr) is not None


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.0.0.2", "::1", "192.168.1.10", "10.1.2.3", "fd00::5",
                                  "::ffff:192.168.1.10"])
def test_accepted_bind_addresses(addr: str) -> None:
    assert check_bind_address(addr) is None


def test_bad_bind_names_its_key(tree: Path) -> None:
    got = problems(tree, with_(base_doc(tree), "server", bind=["127.0.0.1", "0.0.0.0"]))
    assert any(p.startswith("server.bind[1]:") and "every interface" in p for p in got)


def test_lan_bind_needs_keys_or_explicit_opt_in(tree: Path) -> None:
    doc = with_(base_doc(tree), "server", bind=["192.168.1.10"])
    got = problems(tree, doc)
    assert any(p.startswith("server.bind:") and "api_keys_file" in p for p in got)
    assert problems(tree, with_(doc, "server", allow_unauthenticated_lan=True)) == []
    assert problems(tree, with_(doc, "server", api_keys_file=str(tree / "keys"))) == []
    assert problems(tree, with_(base_doc(tree), "server", bind=["::ffff:127.0.0.1"])) == []


def test_keys_file_must_exist_and_hold_a_key(tree: Path) -> None:
    got = problems(tree, with_(base_doc(tree), "server", api_keys_file=str(tree / "missing")))
    assert any(p.startswith("server.api_keys_file:") and "cannot read" in p for p in got)
    (tree / "empty").write_text("# nothing\n\n")
    got = problems(tree, with_(base_doc(tree), "server", api_keys_file=str(tree / "empty")))
    assert any("holds no key" in p for p in got)


def test_port_collisions_and_privileged_child_ports(tree: Path) -> None:
    doc = base_doc(tree)
    doc["metrics"]["port"] = 8080
    doc["models"][1]["port"] = 11436
    doc["models"][0]["port"] = 80
    got = problems(tree, doc)
    assert "metrics.port: 8080 is already used by server.port" in got
    assert any(p.startswith("models[0].port:") and "above 1024" in p for p in got)
    assert any(p.startswith("models[1].port:") or p.startswith("models[0].port:") for p in got)
    doc = base_doc(tree)
    doc["models"][1]["port"] = 11436
    assert "models[1].port: 11436 is already used by models[0].port" in problems(tree, doc)
    assert any("not a TCP port" in p for p in problems(tree, with_(base_doc(tree), "server", port=70000)))


def test_unknown_keys_and_sections_are_errors(tree: Path) -> None:
    doc = with_(base_doc(tree), "server", bnd=["127.0.0.1"])
    doc["models"][0]["ctx"] = 5
    doc["extra"] = {}
    got = problems(tree, doc)
    assert any(p.startswith("server.bnd: unknown key") for p in got)
    assert any(p.startswith("models[0].ctx: unknown key") for p in got)
    assert any(p.startswith("extra: unknown section") for p in got)


def test_types_are_checked(tree: Path) -> None:
    doc = with_(base_doc(tree), "server", port=True, workers="2", bind="127.0.0.1")
    got = problems(tree, doc)
    assert any(p.startswith("server.port: must be an integer") for p in got)
    assert any(p.startswith("server.workers: must be an integer") for p in got)
    assert any(p.startswith("server.bind: must be a list of strings") for p in got)


def test_limits_and_timeouts(tree: Path) -> None:
    got = problems(tree, with_(base_doc(tree), "server", body_limit_bytes=256 * 1024 * 1024 + 1,
                               request_timeout_s=0, graceful_timeout_s=-1))
    assert any(p.startswith("server.body_limit_bytes:") for p in got)
    assert any(p.startswith("server.request_timeout_s:") for p in got)
    assert any(p.startswith("server.graceful_timeout_s:") for p in got)
    assert problems(tree, with_(base_doc(tree), "server", body_limit_bytes=256 * 1024 * 1024)) == []


def test_duplicate_names_and_aliases(tree: Path) -> None:
    doc = base_doc(tree)
    doc["models"][1]["name"] = "chat"
    doc["models"][0]["aliases"] = ["emb-alias", "emb-alias"]
    got = problems(tree, doc)
    assert "models[1].name: 'chat' is already used by models[0].name" in got
    assert any(p.startswith("models[0].aliases[1]:") for p in got)


def test_missing_required_model_keys(tree: Path) -> None:
    doc = base_doc(tree)
    del doc["models"][0]["file"]
    assert "models[0].file: is required" in problems(tree, doc)
    doc = base_doc(tree)
    doc["models"] = []
    assert any(p.startswith("models:") for p in problems(tree, doc))


def test_binary_outside_allowed_prefixes(tree: Path) -> None:
    other = tree / "elsewhere"
    other.mkdir()
    (other / "llama-server").write_text("x")
    got = problems(tree, with_(base_doc(tree), "llama_server", binary=str(other / "llama-server")))
    assert any(p.startswith("llama_server.binary:") and "outside" in p for p in got)
    # ".." tricks are judged on the canonical path
    sneaky = str(tree / "bin" / ".." / "elsewhere" / "llama-server")
    assert any("outside" in p for p in problems(tree, with_(base_doc(tree), "llama_server", binary=sneaky)))
    # a symlink inside the prefix that points outside is refused too
    (tree / "bin" / "link").symlink_to(other / "llama-server")
    got = problems(tree, with_(base_doc(tree), "llama_server", binary=str(tree / "bin" / "link")))
    assert any("outside" in p for p in got)


def test_model_file_must_resolve_under_models_dir(tree: Path) -> None:
    (tree / "secret.gguf").write_text("x")
    (tree / "models" / "escape.gguf").symlink_to(tree / "secret.gguf")
    for file in ("../secret.gguf", str(tree / "secret.gguf"), "escape.gguf"):
        doc = base_doc(tree)
        doc["models"][0]["file"] = file
        assert any(p.startswith("models[0].file:") and "outside models_dir" in p for p in problems(tree, doc)), file
    doc = base_doc(tree)
    doc["models"][0]["file"] = "absent.gguf"
    assert any(p.startswith("models[0].file:") and "does not exist" in p for p in problems(tree, doc))


def test_kind_and_pooling_values(tree: Path) -> None:
    doc = base_doc(tree)
    doc["models"][0]["kind"] = "classify"
    doc["models"][1]["pooling"] = "avg"
    got = problems(tree, doc)
    assert any(p.startswith("models[0].kind:") for p in got)
    assert any(p.startswith("models[1].pooling:") for p in got)


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--alias", "other"], ["--port", "1"], ["-m", "x"],
                                  ["--api-key", "k"], ["--api-key-file", "f"], ["--model-url", "u"], ["--lora", "x"],
                                  ["--rpc", "h"],
                                  ["--ssl-key-file", "k"], ["--path", "/"], ["--mmproj", "x"], ["-ngl", "9"],
                                  ["--host=0.0.0.0"], ["--totally-unknown"], ["stray"], ["--temp"]])
def test_refused_extra_args(args: list[str]) -> None:
    assert check_extra_args(args)


@pytest.mark.parametrize("args", [["--flash-attn", "on"], ["--temp", "0.7", "--top-k", "40"], ["--seed", "-1"],
                                  ["--cache-type-k", "q8_0"], ["--rope-freq-base=10000"], ["--mlock", "--jinja"],
                                  ["-b", "512", "-ub", "256"]])
def test_allowed_extra_args(args: list[str]) -> None:
    assert check_extra_args(args) == []


def test_extra_args_problem_names_the_key(tree: Path) -> None:
    doc = base_doc(tree)
    doc["models"][0]["extra_args"] = ["--host", "0.0.0.0"]
    got = problems(tree, doc)
    assert any(p.startswith("models[0].extra_args: --host is not allowed") for p in got)


def test_relative_paths_are_taken_from_the_config_file(tree: Path) -> None:
    doc = base_doc(tree)
    doc["llama_server"] = {"binary": "bin/llama-server", "allowed_binary_prefixes": ["bin/"], "models_dir": "models"}
    path = tree / "appliance.toml"
    path.write_text(render_toml(doc))
    cfg = load(path)
    assert cfg.llama_server.binary == str(tree / "bin" / "llama-server")
    assert cfg.source == path


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "check-config", str(path)], capture_output=True,
                          text=True, cwd=REPO, env=os.environ)


def test_check_config_cli_lists_every_problem_and_exits_1(tree: Path) -> None:
    doc = with_(base_doc(tree), "server", bind=["0.0.0.0"], workers=0)
    doc["models"][0]["extra_args"] = ["--api-key", "x"]
    path = tree / "bad.toml"
    path.write_text(render_toml(doc))
    r = run_check(path)
    assert r.returncode == 1
    assert "server.bind[0]" in r.stderr and "server.workers" in r.stderr and "models[0].extra_args" in r.stderr


def test_check_config_cli_ok_and_usage_errors(tree: Path) -> None:
    path = tree / "good.toml"
    path.write_text(render_toml(base_doc(tree)))
    r = run_check(path)
    assert r.returncode == 0 and "OK" in r.stdout.splitlines()[0]
    assert "memory budgets: none" in r.stdout  # then the plan
    r = subprocess.run([sys.executable, "-m", "appliance", "check-config"], capture_output=True, cwd=REPO)
    assert r.returncode == 2
    (tree / "broken.toml").write_text("[server\n")
    r = run_check(tree / "broken.toml")
    assert r.returncode == 1 and "not valid TOML" in r.stderr


def test_example_config_is_valid_after_setup() -> None:
    # The README's setup installs the binary and the model that examples/local.toml points at.
    r = run_check(REPO / "examples" / "local.toml")
    assert r.returncode == 0, r.stderr


def test_named_api_keys(tree: Path) -> None:
    keys = tree / "keys"
    keys.write_text("# team keys\nalice: sk-alice-1\nsk-bare-2\n\nci-bot :  sk-ci-3\n")
    got = read_api_keys(keys)
    assert got["sk-alice-1"] == "alice"
    assert got["sk-ci-3"] == "ci-bot"
    assert got["sk-bare-2"].startswith("key-") and len(got["sk-bare-2"]) == 12
    assert "sk-bare-2" not in got["sk-bare-2"]


@pytest.mark.parametrize(("text", "reason"), [
    ("a: k1\na: k2\n", "name 'a' is already used"),
    ("a: k1\nb: k1\n", "already listed"),
    ("a: two words\n", "must not contain spaces"),
])
def test_bad_api_keys_files_name_the_line(tree: Path, text: str, reason: str) -> None:
    (tree / "keys").write_text(text)
    got = problems(tree, with_(base_doc(tree), "server", api_keys_file=str(tree / "keys")))
    assert any(p.startswith("server.api_keys_file:") and "line " in p and reason in p for p in got), got


def test_chat_template_builtin_or_file(tree: Path) -> None:
    doc = base_doc(tree)
    doc["models"][0]["chat_template"] = "gemma"
    assert problems(tree, doc) == []
    doc["models"][0]["chat_template"] = "gemmma"
    assert any(p.startswith("models[0].chat_template:") and "built-in" in p for p in problems(tree, doc))
    doc["models"][0]["chat_template"] = "t.jinja"
    assert any(p.startswith("models[0].chat_template:") and "does not exist" in p for p in problems(tree, doc))
    doc["models"][0]["chat_template"] = "../t.jinja"
    assert any(p.startswith("models[0].chat_template:") and "outside models_dir" in p for p in problems(tree, doc))
    doc["models"][1]["chat_template"] = "gemma"
    assert any(p.startswith("models[1].chat_template:") and "only chat" in p for p in problems(tree, doc))


def test_max_queue_default_and_bounds(tree: Path) -> None:
    doc = base_doc(tree)
    doc["models"][0]["parallel"] = 3
    cfg = parse(doc, tree, check_files=False)
    assert cfg.models[0].max_queue is None and cfg.models[0].queue_limit == 15
    doc["models"][0]["max_queue"] = 0
    assert parse(doc, tree, check_files=False).models[0].queue_limit == 3
    doc["models"][0]["max_queue"] = -1
    assert any(p.startswith("models[0].max_queue:") for p in problems(tree, doc))


def test_http_limits_and_cors_origins(tree: Path) -> None:
    doc = with_(base_doc(tree), "server", max_header_bytes=512, max_url_bytes=100000, header_timeout_s=0,
                cors_allow_origins=["https://app.example", "https://x.example/path"])
    got = problems(tree, doc)
    for key in ("max_header_bytes", "max_url_bytes", "header_timeout_s", "cors_allow_origins[1]"):
        assert any(p.startswith(f"server.{key}:") for p in got), (key, got)
    assert not any(p.startswith("server.cors_allow_origins[0]") for p in got)
