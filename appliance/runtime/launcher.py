"""Start one model's llama-server: what supervisord runs for each ``[[models]]`` entry.

The launcher re-checks every path at exec time (a symlink may have changed since the config was validated), clears the
environment to an allow-list, and replaces itself with llama-server: no shell, no parent left to forward signals, so
supervisord's PID is llama-server's PID. It also applies the restart backoff (SPEC §3): starts that follow a short-lived
run are delayed exponentially; supervisord's ``startretries`` bounds how many such starts happen before FATAL.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from appliance.config import ApplianceConfig, ModelConfig
from appliance.config.args import check_extra_args
from appliance.runtime.names import program_name

ENV_ALLOWED = frozenset({"PATH", "HOME", "LD_LIBRARY_PATH"})
ENV_ALLOWED_PREFIXES = ("GGML_", "VK_", "HIP_", "ROCR_", "ROCM_", "HSA_", "CUDA_", "NVIDIA_", "MESA_", "RADV_")


class LaunchError(RuntimeError):
    pass


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed environment: LLAMA_ARG_* would silently override our flags, HF_TOKEN is a secret."""
    return {k: v for k, v in environ.items() if k in ENV_ALLOWED or k.startswith(ENV_ALLOWED_PREFIXES)}


def resolve_binary(cfg: ApplianceConfig) -> Path:
    binary = Path(os.path.realpath(cfg.llama_server.binary))
    prefixes = [Path(os.path.realpath(p)) for p in cfg.llama_server.allowed_binary_prefixes]
    if not any(binary.is_relative_to(p) for p in prefixes):
        allowed = ", ".join(str(p) for p in prefixes)
        raise LaunchError(f"refusing llama-server binary {binary}: its canonical path is outside {allowed}")
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise LaunchError(f"llama-server binary {binary} is missing or not executable")
    return binary


def resolve_model_file(cfg: ApplianceConfig, path: str) -> Path:
    models_dir = Path(os.path.realpath(cfg.llama_server.models_dir))
    real = Path(os.path.realpath(models_dir / path))
    if not real.is_relative_to(models_dir):
        raise LaunchError(f"refusing model file {path}: it resolves to {real}, outside models_dir {models_dir}")
    if not real.is_file():
        raise LaunchError(f"model file {real} does not exist")
    return real


def build_argv(cfg: ApplianceConfig, model: ModelConfig) -> list[str]:
    problems = check_extra_args(model.extra_args)
    if problems:
        raise LaunchError(f"refusing extra_args of {model.name}: {'; '.join(problems)}")
    argv = [
        str(resolve_binary(cfg)),
        "--model", str(resolve_model_file(cfg, model.file)),
        # Responses name the model as clients know it, never the file's path on this host.
        "--alias", model.name,
        "--host", "127.0.0.1",
        "--port", str(model.port),
        "--ctx-size", str(model.ctx_size),
        "--n-gpu-layers", str(model.gpu_layers),
        "--threads", str(model.threads),
        "--parallel", str(model.parallel),
    ]
    if model.kind == "embed":
        argv += ["--embeddings", "--pooling", model.pooling]
    elif model.kind == "rerank":
        argv += ["--reranking"]
    if model.chat_template.endswith(".jinja"):
        argv += ["--chat-template-file", str(resolve_model_file(cfg, model.chat_template))]
    elif model.chat_template:
        # With the Jinja engine on (llama-server's default) a built-in name would be taken for the template's text.
        argv += ["--no-jinja", "--chat-template", model.chat_template]
    if model.mmproj:
        argv += ["--mmproj", str(resolve_model_file(cfg, model.mmproj))]
    if model.gpu_devices:
        argv += ["--device", ",".join(model.gpu_devices)]
    argv += ["--metrics", "--no-webui", *model.extra_args]
    return argv


def backoff_delay(cfg: ApplianceConfig, model: ModelConfig, now: float | None = None) -> float:
    """Record this start; return how long to wait first. A start within stable_uptime_s of the last one is a failure
    in a row (the previous run was short-lived); a longer run refills the budget."""
    sup = cfg.supervision
    state_dir = Path(sup.runtime_dir) / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{program_name(model)}.json"
    now = time.time() if now is None else now
    try:
        state = json.loads(path.read_text())
        last, failures = float(state["last_start"]), int(state["failures"])
    except (OSError, ValueError, KeyError, TypeError):
        last, failures = 0.0, -1
    # last_start is recorded after the backoff sleep, so now - last is the previous run's uptime (plus supervisord's
    # own short respawn delay).
    failures = failures + 1 if now - last < sup.stable_uptime_s else 0
    delay = 0.0 if failures == 0 else min(sup.backoff_initial_s * 2 ** (failures - 1), sup.backoff_max_s)
    path.write_text(json.dumps({"last_start": now + delay, "failures": failures}))
    return delay


def exec_model(cfg: ApplianceConfig, name: str) -> None:
    try:
        model = cfg.model(name)
    except KeyError:
        raise LaunchError(f"no model named {name!r} in {cfg.source}") from None
    argv = build_argv(cfg, model)
    # The model manager paces an on-demand model's loads itself: a swap soon after the last one is no failure.
    delay = 0.0 if model.on_demand else backoff_delay(cfg, model)
    if delay:
        print(f"run-model {name}: restarting after a short-lived run; waiting {delay:g} s", file=sys.stderr, flush=True)
        time.sleep(delay)
    os.execve(argv[0], argv, child_env(os.environ))
