"""The allow-list for a model's ``extra_args`` (SPEC §3).

The launcher owns every flag that decides what llama-server listens on, which files it reads and who may call it;
``extra_args`` may only tune performance, sampling defaults, the KV cache and RoPE. Anything else is refused, and the
flags the launcher owns get a message that says which config key to use instead.
"""

from __future__ import annotations

from collections.abc import Iterable

REFUSED: dict[str, str] = {
    "--host": "the launcher binds llama-server to 127.0.0.1",
    "--port": "set models[].port",
    "-m": "set models[].file",
    "--model": "set models[].file",
    "--api-key": "API keys are checked by the proxy (server.api_keys_file)",
    "--api-key-file": "API keys are checked by the proxy (server.api_keys_file)",
    "--model-url": "models are never fetched at run time; install the file under models_dir",
    "-mu": "models are never fetched at run time; install the file under models_dir",
    "-hf": "models are never fetched at run time; install the file under models_dir",
    "--hf-repo": "models are never fetched at run time; install the file under models_dir",
    "--lora": "LoRA adapters are not supported by this appliance yet",
    "--lora-scaled": "LoRA adapters are not supported by this appliance yet",
    "--rpc": "remote backends would expose the host to the network",
    "--ssl-key-file": "TLS is terminated in front of the proxy, not by llama-server",
    "--ssl-cert-file": "TLS is terminated in front of the proxy, not by llama-server",
    "--path": "llama-server must not serve static files",
    "--alias": "the launcher sets it to models[].name (more names: models[].aliases)",
    "-a": "the launcher sets it to models[].name (more names: models[].aliases)",
    "--mmproj": "set models[].mmproj",
    "-ngl": "set models[].gpu_layers",
    "--n-gpu-layers": "set models[].gpu_layers",
    "--gpu-layers": "set models[].gpu_layers",
    "-c": "set models[].ctx_size",
    "--ctx-size": "set models[].ctx_size",
    "-t": "set models[].threads",
    "--threads": "set models[].threads",
    "-np": "set models[].parallel",
    "--parallel": "set models[].parallel",
    "--embedding": "set models[].kind = \"embed\"",
    "--embeddings": "set models[].kind = \"embed\"",
    "--pooling": "set models[].pooling",
    "--rerank": "set models[].kind = \"rerank\"",
    "--reranking": "set models[].kind = \"rerank\"",
    "--chat-template": "set models[].chat_template",
    "--chat-template-file": "set models[].chat_template (a .jinja file under models_dir)",
    "--metrics": "always on",
    "--no-webui": "always on",
    "--webui": "the web UI stays off",
    "--slot-save-path": "writes files outside the models directory",
    "--device": "set models[].devices (memory budgets are planned per device)",
    "-dev": "set models[].devices (memory budgets are planned per device)",
}

# Flags that take no value.
ALLOWED_SWITCHES = frozenset({
    "--mlock", "--no-mmap", "--cont-batching", "-cb", "--no-cont-batching", "-nocb", "--jinja", "--no-jinja",
    "--kv-unified", "-kvu", "--swa-full", "--no-kv-offload", "-nkvo", "--no-warmup", "--check-tensors",
    "--no-context-shift", "--context-shift", "--no-op-offload",
})

# Flags that take exactly one value.
ALLOWED_WITH_VALUE = frozenset({
    # performance
    "--batch-size", "-b", "--ubatch-size", "-ub", "--threads-batch", "-tb", "--flash-attn", "-fa", "--numa",
    "--split-mode", "-sm", "--main-gpu", "-mg", "--tensor-split", "-ts", "--poll", "--prio", "--cpu-mask", "-C",
    "--cpu-range", "-Cr", "--override-tensor", "-ot", "--n-cpu-moe", "-ncmoe",
    # cache
    "--cache-type-k", "-ctk", "--cache-type-v", "-ctv", "--defrag-thold", "-dt", "--cache-reuse",
    "--cache-ram", "-cram",
    "--ctx-checkpoints", "--keep",
    # sampling defaults
    "--temp", "--top-k", "--top-p", "--min-p", "--typical", "--repeat-penalty", "--repeat-last-n",
    "--presence-penalty", "--frequency-penalty", "--seed", "-s", "--n-predict", "-n", "--predict", "--mirostat",
    "--mirostat-lr", "--mirostat-ent", "--dry-multiplier", "--samplers", "--reasoning-format", "--reasoning-budget",
    # rope
    "--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale", "--yarn-orig-ctx",
    "--yarn-ext-factor", "--yarn-attn-factor", "--yarn-beta-slow", "--yarn-beta-fast",
})


def _is_value(token: str) -> bool:
    if not token.startswith("-"):
        return True
    try:
        float(token)  # negative numbers, e.g. --seed -1
    except ValueError:
        return False
    return True


def check_extra_args(args: Iterable[str]) -> list[str]:
    """Return one reason per refused token; an empty list means every argument is allowed."""
    problems: list[str] = []
    tokens = list(args)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        flag, eq, _ = token.partition("=")
        i += 1
        if flag in REFUSED:
            problems.append(f"{flag} is not allowed: {REFUSED[flag]}")
        elif flag in ALLOWED_SWITCHES:
            if eq:
                problems.append(f"{flag} takes no value")
        elif flag in ALLOWED_WITH_VALUE:
            if not eq:
                if i < len(tokens) and _is_value(tokens[i]):
                    i += 1
                else:
                    problems.append(f"{flag} needs a value")
        elif _is_value(token):
            problems.append(f"{token!r} is not preceded by a flag that takes a value")
        else:
            problems.append(
                f"{flag} is not on the allow-list (performance, sampling, cache and rope flags only; "
                "see docs/configuration.md)"
            )
    return problems
