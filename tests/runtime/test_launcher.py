"""The launcher's argv, environment and path checks, and the generated supervisord config."""

from __future__ import annotations

import configparser
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, parse
from appliance.runtime.launcher import LaunchError, backoff_delay, build_argv, child_env
from appliance.runtime.supervisor_conf import GUNICORN_CONF, proxy_fingerprint, render
from tests.config.test_config import base_doc, tree  # noqa: F401  (fixture)
from tests.helpers import REPO, render_toml


@pytest.fixture()
def cfg(tree: Path) -> ApplianceConfig:  # noqa: F811
    (tree / "models" / "proj.gguf").write_bytes(b"GGUF")
    doc = base_doc(tree)
    doc["models"][0]["extra_args"] = ["--flash-attn", "on"]
    doc["models"].append({"name": "vision", "file": "m.gguf", "mmproj": "proj.gguf", "port": 11438,
                          "gpu_layers": 99, "threads": 8, "parallel": 4, "ctx_size": 8192})
    doc["supervision"] = {"runtime_dir": str(tree / "run"), "max_restarts": 3, "stable_uptime_s": 10,
                          "backoff_initial_s": 1.0, "backoff_max_s": 4.0}
    path = tree / "appliance.toml"
    path.write_text(render_toml(doc))
    from appliance.config import load

    return load(path)


def test_chat_argv(cfg: ApplianceConfig, tree: Path) -> None:  # noqa: F811
    argv = build_argv(cfg, cfg.models[0])
    assert argv == [str(tree / "bin" / "llama-server"), "--model", str(tree / "models" / "m.gguf"),
                    "--alias", "chat", "--host", "127.0.0.1", "--port", "11436", "--ctx-size", "4096",
                    "--n-gpu-layers", "0", "--threads", "2", "--parallel", "2", "--metrics", "--no-webui",
                    "--flash-attn", "on"]


def test_embed_argv(cfg: ApplianceConfig) -> None:
    argv = build_argv(cfg, cfg.models[1])
    i = argv.index("--embeddings")
    assert argv[i + 1:i + 3] == ["--pooling", "mean"]
    assert argv[argv.index("--port") + 1] == "11437"


def test_mmproj_argv(cfg: ApplianceConfig, tree: Path) -> None:  # noqa: F811
    argv = build_argv(cfg, cfg.models[2])
    assert argv[argv.index("--mmproj") + 1] == str(tree / "models" / "proj.gguf")
    assert argv[argv.index("--n-gpu-layers") + 1] == "99"
    assert "--embeddings" not in argv


def test_rerank_and_chat_template_argv(cfg: ApplianceConfig, tree: Path) -> None:  # noqa: F811
    (tree / "models" / "t.jinja").write_text("{{ messages }}")
    rerank = dataclasses.replace(cfg.models[1], kind="rerank")
    argv = build_argv(cfg, rerank)
    assert "--reranking" in argv and "--embeddings" not in argv
    builtin = build_argv(cfg, dataclasses.replace(cfg.models[0], chat_template="gemma"))
    at = builtin.index("--chat-template")
    assert builtin[at - 1:at + 2] == ["--no-jinja", "--chat-template", "gemma"]
    jinja = build_argv(cfg, dataclasses.replace(cfg.models[0], chat_template=str(tree / "models" / "t.jinja")))
    assert jinja[jinja.index("--chat-template-file") + 1] == str(tree / "models" / "t.jinja")
    escaped = dataclasses.replace(cfg.models[0], chat_template=str(tree / "t.jinja"))
    with pytest.raises(LaunchError, match="outside models_dir"):
        build_argv(cfg, escaped)


def test_env_allow_list() -> None:
    env = child_env({"PATH": "/bin", "HOME": "/h", "LD_LIBRARY_PATH": "/l", "CUDA_VISIBLE_DEVICES": "0",
                     "GGML_CUDA_FORCE_MMQ": "1", "HIP_VISIBLE_DEVICES": "1", "LLAMA_ARG_HOST": "0.0.0.0",
                     "LLAMA_API_KEY": "k", "HF_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "s", "PYTHONPATH": "/p"})
    assert env == {"PATH": "/bin", "HOME": "/h", "LD_LIBRARY_PATH": "/l", "CUDA_VISIBLE_DEVICES": "0",
                   "GGML_CUDA_FORCE_MMQ": "1", "HIP_VISIBLE_DEVICES": "1"}


def test_binary_swapped_for_a_symlink_after_validation_is_refused(cfg: ApplianceConfig, tree: Path) -> None:  # noqa: F811
    outside = tree / "evil"
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o755)
    binary = tree / "bin" / "llama-server"
    binary.unlink()
    binary.symlink_to(outside)
    with pytest.raises(LaunchError, match="outside"):
        build_argv(cfg, cfg.models[0])


def test_binary_outside_prefix_or_not_executable(cfg: ApplianceConfig, tree: Path) -> None:  # noqa: F811
    moved = dataclasses.replace(cfg.llama_server, binary=str(tree / "bin" / ".." / "models" / "m.gguf"))
    with pytest.raises(LaunchError, match="outside"):
        build_argv(dataclasses.replace(cfg, llama_server=moved), cfg.models[0])
    (tree / "bin" / "llama-server").chmod(0o644)
    with pytest.raises(LaunchError, match="not executable"):
        build_argv(cfg, cfg.models[0])


def test_model_symlink_escaping_models_dir_is_refused(cfg: ApplianceConfig, tree: Path) -> None:  # noqa: F811
    (tree / "models" / "m.gguf").unlink()
    (tree / "models" / "m.gguf").symlink_to(tree / "keys")
    with pytest.raises(LaunchError, match="outside models_dir"):
        build_argv(cfg, cfg.models[0])


def test_refused_extra_args_at_launch(cfg: ApplianceConfig) -> None:
    bad = dataclasses.replace(cfg.models[0], extra_args=("--api-key", "x"))
    with pytest.raises(LaunchError, match="--api-key is not allowed"):
        build_argv(cfg, bad)


def test_run_model_prints_one_line_and_exits_nonzero(cfg: ApplianceConfig) -> None:
    assert cfg.source is not None
    r = subprocess.run([sys.executable, "-m", "appliance", "run-model", "nope", "--config", str(cfg.source)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no model named 'nope'" in r.stderr


def test_run_model_execs_without_shell_and_clears_env(cfg: ApplianceConfig, tree: Path) -> None:  # noqa: F811
    # A fake llama-server that prints its argv and environment: the launcher must exec it directly.
    (tree / "bin" / "llama-server").write_text(
        f"#!{sys.executable}\nimport os, sys, json\nprint(json.dumps([os.getpid(), sys.argv[1:], dict(os.environ)]))\n")
    assert cfg.source is not None
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run-model", "chat", "--config", str(cfg.source)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "LLAMA_ARG_PORT": "1", "HF_TOKEN": "x", "CUDA_VISIBLE_DEVICES": "0"})
    out, _ = proc.communicate(timeout=30)
    import json

    pid, args, env = json.loads(out)
    assert pid == proc.pid  # exec, not a child process
    assert args[args.index("--port") + 1] == "11436"
    assert "LLAMA_ARG_PORT" not in env and "HF_TOKEN" not in env and env["CUDA_VISIBLE_DEVICES"] == "0"


def test_backoff_doubles_for_short_runs_and_refills_after_stable_uptime(cfg: ApplianceConfig) -> None:
    m = cfg.models[0]
    t = 1000.0
    assert backoff_delay(cfg, m, now=t) == 0.0
    assert backoff_delay(cfg, m, now=t + 1) == 1.0
    assert backoff_delay(cfg, m, now=t + 3) == 2.0
    assert backoff_delay(cfg, m, now=t + 6) == 4.0
    assert backoff_delay(cfg, m, now=t + 11) == 4.0  # capped at backoff_max_s
    assert backoff_delay(cfg, m, now=t + 100) == 0.0  # ran longer than stable_uptime_s: budget refilled


def test_supervisor_conf(cfg: ApplianceConfig) -> None:
    parser = configparser.RawConfigParser()
    parser.read_string(render(cfg))
    progs = [s for s in parser.sections() if s.startswith("program:")]
    assert progs == ["program:model-chat", "program:model-emb", "program:model-vision", "program:proxy",
                     "program:exporter"]
    model = parser["program:model-chat"]
    assert " -m appliance run-model chat --config " in model["command"]
    assert model["startretries"] == "3" and model["startsecs"] == "10"
    proxy = parser["program:proxy"]
    assert proxy["killasgroup"] == "true" and proxy["stopasgroup"] == "true"
    graceful = cfg.server.graceful_timeout_s + 5  # gunicorn_conf's graceful_timeout
    assert int(proxy["stopwaitsecs"]) > graceful
    assert parser["unix_http_server"]["chmod"] == "0770"
    assert parser["supervisorctl"]["serverurl"] == "unix://" + parser["unix_http_server"]["file"]
    assert "rpcinterface:supervisor" in parser.sections()
    assert parser["eventlistener:events"]["events"] == "PROCESS_STATE"


def test_gunicorn_config_is_accepted_by_gunicorn(cfg: ApplianceConfig) -> None:
    assert cfg.source is not None
    r = subprocess.run([sys.executable, "-m", "gunicorn", "--check-config", "-c", GUNICORN_CONF],
                       capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "APPLIANCE_CONFIG": str(cfg.source)})
    assert r.returncode == 0, r.stderr


def test_parse_keeps_runtime_dir_absolute(tree: Path) -> None:  # noqa: F811
    doc = base_doc(tree)
    doc["supervision"] = {"runtime_dir": "run"}
    assert parse(doc, tree).supervision.runtime_dir == str(tree / "run")


def test_supervisord_parses_odd_names_and_paths(tree: Path) -> None:  # noqa: F811
    import shlex

    from supervisor.options import ServerOptions

    from appliance.runtime.supervisor_conf import write_supervisor_conf

    odd = tree / "dir with space%"
    odd.mkdir()
    doc = base_doc(tree)
    doc["models"][0]["name"] = "org/model:v1 50%"
    doc["supervision"] = {"runtime_dir": str(tree / "run")}
    path = odd / "appliance.toml"
    path.write_text(render_toml(doc))
    from appliance.config import load

    conf = write_supervisor_conf(load(path))
    opts = ServerOptions()
    opts.configfile = str(conf)
    opts.process_config(do_usage=False)
    programs = {g.name: g.process_configs[0] for g in opts.process_group_configs}
    argv = shlex.split(programs["model-org_model_v1_50_"].command)
    assert argv[-4:] == ["run-model", "org/model:v1 50%", "--config", str(path)]
    assert programs["proxy"].environment["APPLIANCE_CONFIG"] == str(path)


def _sections(cfg: ApplianceConfig) -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser()
    parser.read_string(render(cfg))
    return {name: dict(parser[name]) for name in parser.sections()}


def test_a_change_shows_in_the_sections_of_the_programs_that_read_it(cfg: ApplianceConfig, tree: Path) -> None:  # noqa: F811
    """What `appliance reload` relies on: supervisord restarts exactly the programs whose section changed."""
    before = _sections(cfg)

    def changed(new: ApplianceConfig) -> set[str]:
        after = _sections(new)
        return {name.split(":")[1] for name in after if after[name] != before.get(name)}

    chat, emb = cfg.models[0], cfg.models[1]
    bigger = dataclasses.replace(cfg, models=(dataclasses.replace(chat, ctx_size=8192), *cfg.models[1:]))
    assert changed(bigger) == {"model-chat"}
    moved = dataclasses.replace(cfg, models=(chat, dataclasses.replace(emb, port=11499), cfg.models[2]))
    assert changed(moved) == {"model-emb", "exporter", "events"}  # both talk to the model's port
    server = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, workers=7, request_timeout_s=5))
    assert changed(server) == set()  # the proxy replaces its workers on SIGHUP instead
    assert proxy_fingerprint(server) != proxy_fingerprint(cfg)
    keys = tree / "keys"
    keys.write_text("sk-old\n")
    keyed = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, api_keys_file=str(keys)))
    before_rotation = proxy_fingerprint(keyed)
    keys.write_text("sk-new\n")
    assert proxy_fingerprint(keyed) != before_rotation  # rotating keys in place replaces the workers
    metrics = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, port=9999))
    assert changed(metrics) == {"exporter"}
    events = dataclasses.replace(cfg, events=dataclasses.replace(cfg.events, batch_size=5))
    assert changed(events) == {"events"}
    # A new llama-server binary (a new file in place) restarts every model, nothing else.
    binary = Path(cfg.llama_server.binary)
    binary.unlink()
    binary.write_text("#!/bin/sh\n")
    assert changed(cfg) == {"model-chat", "model-emb", "model-vision"}
    # A chat template file edited in place restarts its model only.
    template = tree / "models" / "chat.jinja"
    template.write_text("{{ messages }}")
    templated = dataclasses.replace(cfg, models=(dataclasses.replace(chat, chat_template=str(template)),
                                                 *cfg.models[1:]))
    before = _sections(templated)
    template.unlink()
    template.write_text("{{ messages }}\n")
    assert changed(templated) == {"model-chat"}


def test_log_dir(tree: Path) -> None:  # noqa: F811
    doc = base_doc(tree)
    doc["supervision"] = {"runtime_dir": str(tree / "run")}
    assert parse(doc, tree).log_dir == tree / "run" / "logs"
    doc["supervision"]["log_dir"] = "logs"
    cfg = parse(doc, tree)
    assert cfg.log_dir == tree / "logs"
    assert f"logfile={tree / 'logs' / 'supervisord.log'}" in render(dataclasses.replace(cfg, source=tree / "a.toml"))
