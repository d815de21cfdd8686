"""Load and validate the appliance TOML file, fail-closed.

Every problem is collected (not just the first) and names its key, so that ``appliance check-config`` can print them
all at once and an operator fixes the file in one pass. Nothing here starts processes or touches the network.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

from appliance.config.args import check_extra_args
from appliance.config.model import (
    ALWAYS,
    BODY_LIMIT_MAX,
    CPU,
    DEFAULT_CLIENT,
    ON_DEMAND,
    ApplianceConfig,
    ClientPolicy,
    EventsConfig,
    LlamaServerConfig,
    MetricsConfig,
    ModelConfig,
    ServerConfig,
    SupervisionConfig,
)
from appliance.config.tls import check_pair, validity_warning

DEFAULT_PATH = Path("/etc/appliance/appliance.toml")
KINDS = ("chat", "embed", "rerank")
# A key's name: what metrics and events show instead of the key.
_KEY_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
POOLINGS = ("none", "mean", "cls", "last", "rank")
LOADS = (ALWAYS, ON_DEMAND)
# llama.cpp's device names: CPU (host memory), CUDA0, ROCm0, Vulkan0, Metal, SYCL0...
_DEVICE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
# llama-server's built-in chat templates (``llama-server --help``, pinned version); anything else is a .jinja file.
CHAT_TEMPLATES = frozenset({
    "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml", "command-r", "deepseek", "deepseek-ocr",
    "deepseek2", "deepseek3", "exaone-moe", "exaone3", "exaone4", "falcon3", "gemma", "gigachat", "glmedge",
    "gpt-oss", "granite", "granite-4.0", "granite-4.1", "grok-2", "hunyuan-dense", "hunyuan-moe", "hunyuan-vl",
    "kimi-k2", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "llama3", "llama4", "megrez", "minicpm",
    "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "monarch", "openchat",
    "orion", "pangu-embedded", "phi3", "phi4", "rwkv-world", "seed_oss", "smolvlm", "solar-open", "vicuna",
    "vicuna-orca", "yandex", "zephyr",
})


def is_pattern(alias: str) -> bool:
    """An alias with glob characters (``gpt-*``, ``claude-?-*``, ``text-embedding-[23]*``) matches many names."""
    return any(c in alias for c in "*?[")


def is_template_file(text: str) -> bool:
    return text.endswith(".jinja")


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every ``key: reason``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, reason: str) -> None:
        self.items.append(f"{key}: {reason}")


def _typename(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", tuple: "a list of strings"}[t]


def _coerce(value: Any, expected: type, key: str, problems: _Problems) -> Any:
    # bool is a subclass of int in Python: `port = true` must not pass as port 1.
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        problems.add(key, f"must be {_typename(expected)}, got {value!r}")
        return MISSING
    return value


def _section(cls: type, raw: Any, prefix: str, problems: _Problems, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Type-check one table against the dataclass ``cls``; unknown keys are errors (typos must not pass silently)."""
    if not isinstance(raw, dict):
        problems.add(prefix, "must be a table")
        return {}
    types: dict[str, type] = {}
    for f in fields(cls):
        if f.name == "source":
            continue
        default = f.default if f.default is not MISSING else None
        types[f.name] = type(default) if default is not None else (int if f.name in ("port", "max_queue") else str)
    known = ", ".join(sorted(types))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in types:
            problems.add(f"{prefix}.{key}", f"unknown key (known keys: {known})")
            continue
        coerced = _coerce(value, types[key], f"{prefix}.{key}", problems)
        if coerced is not MISSING:
            out[key] = coerced
    for key in required:
        if key not in raw:
            problems.add(f"{prefix}.{key}", "is required")
    return out


def check_bind_address(text: str) -> str | None:
    """Return why ``text`` is not an acceptable public bind address, or None when it is."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return f"{text!r} is not an IP address (use a numeric address of this host, e.g. 127.0.0.1 or 192.168.1.10)"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # ::ffff:0.0.0.0 binds every IPv4 address on dual-stack hosts: judge the mapped address.
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return f"{text} listens on every interface; name the one address clients should use"
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        return f"{text} is the broadcast address"
    if addr.is_multicast:
        return f"{text} is a multicast address"
    return None


def _is_loopback(text: str) -> bool:
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _resolve(base: Path, text: str) -> Path:
    """Canonical path: relative paths are taken from the config file's directory, symlinks are followed."""
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = base / p
    return p.resolve()


def key_label(key: str) -> str:
    """The name of a key given without one: a short hash, stable and safe to show."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def read_api_keys(path: Path) -> dict[str, str]:
    """``{key: name}``. One key per line, ``name: key`` or a bare key (named by a short hash of itself); blank lines
    and lines starting with '#' are ignored. Raises ValueError naming the line of a malformed entry."""
    keys: dict[str, str] = {}
    names: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, key = text.partition(":")
        if sep and _KEY_NAME.match(name.strip()) and key.strip():
            name, key = name.strip(), key.strip()
        else:
            name, key = key_label(text), text
        if any(c.isspace() for c in key):
            raise ValueError(f"line {n}: a key must not contain spaces (write 'name: key' or the bare key)")
        if key in keys:
            raise ValueError(f"line {n}: this key is already listed (as {keys[key]!r})")
        if name in names:
            raise ValueError(f"line {n}: the name {name!r} is already used by another key")
        keys[key] = name
        names.add(name)
    return keys


def _check_server(server: ServerConfig, base: Path, problems: _Problems) -> None:
    if not server.bind:
        problems.add("server.bind", "must name at least one address")
    bad = False
    for i, text in enumerate(server.bind):
        reason = check_bind_address(text)
        if reason:
            bad = True
            problems.add(f"server.bind[{i}]", reason)
    if not bad and not server.api_keys_file and not server.allow_unauthenticated_lan:
        lan = [b for b in server.bind if not _is_loopback(b)]
        if lan:
            problems.add(
                "server.bind",
                f"{', '.join(lan)} is reachable from the network but no api_keys_file is set; "
                "set server.api_keys_file, or server.allow_unauthenticated_lan = true to accept that risk",
            )
    if server.api_keys_file:
        keys_path = _resolve(base, server.api_keys_file)
        try:
            if not read_api_keys(keys_path):
                problems.add("server.api_keys_file", f"{keys_path} holds no key (one 'name: key' per line)")
        except OSError as e:
            problems.add("server.api_keys_file", f"cannot read {keys_path}: {e.strerror}")
        except ValueError as e:
            problems.add("server.api_keys_file", f"{keys_path}, {e}")
    _check_tls(server, base, problems)
    if server.workers < 1:
        problems.add("server.workers", "must be at least 1")
    if not 0 < server.body_limit_bytes <= BODY_LIMIT_MAX:
        problems.add("server.body_limit_bytes", f"must be between 1 and {BODY_LIMIT_MAX} (256 MiB)")
    for key in ("request_timeout_s", "graceful_timeout_s", "header_timeout_s", "body_idle_timeout_s", "load_timeout_s"):
        if getattr(server, key) <= 0:
            problems.add(f"server.{key}", "must be greater than 0")
    for key, low in (("max_header_bytes", 1024), ("max_url_bytes", 256), ("max_headers", 8),
                     ("max_connections_per_worker", 1)):
        if getattr(server, key) < low:
            problems.add(f"server.{key}", f"must be at least {low}")
    if server.min_residency_s < 0:
        problems.add("server.min_residency_s", "must be 0 or more")
    if server.max_url_bytes > server.max_header_bytes:
        problems.add("server.max_url_bytes", "must not exceed server.max_header_bytes (the URL is part of the head)")
    for i, origin in enumerate(server.cors_allow_origins):
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            problems.add(f"server.cors_allow_origins[{i}]",
                         f"{origin!r} is not an origin (scheme://host[:port], no path, e.g. https://app.example)")


def _check_tls(server: ServerConfig, base: Path, problems: _Problems) -> None:
    """Both TLS files or neither; when both, a certificate and its own key that the proxy can load."""
    if not server.tls_cert_file and not server.tls_key_file:
        return
    if not (server.tls_cert_file and server.tls_key_file):
        given, missing = (("tls_cert_file", "tls_key_file") if server.tls_cert_file
                          else ("tls_key_file", "tls_cert_file"))
        problems.add(f"server.{missing}", f"must be set too, since server.{given} is: set both (the PEM certificate "
                     "chain and its private key) to serve HTTPS, or neither for plain HTTP")
        return
    for key, reason in check_pair(_resolve(base, server.tls_cert_file), _resolve(base, server.tls_key_file)):
        problems.add(key, reason)


def config_warnings(cfg: ApplianceConfig, now: dt.datetime | None = None) -> list[str]:
    """Risks that a valid config still carries, as ``key: reason``. `appliance check-config` and `appliance up` print
    them; they never change an exit status (an expiring certificate must not stop a restart)."""
    server = cfg.server
    out: list[str] = []
    lan = [b for b in server.bind if not _is_loopback(b)]
    if lan and server.api_keys_file and not server.tls_cert_file:
        out.append(f"server.bind: {', '.join(lan)} is reachable from the network and serves plain HTTP, so API keys "
                   "(and prompts) travel in clear text; set server.tls_cert_file and server.tls_key_file to serve "
                   "HTTPS (docs/operations.md: Rotate the TLS certificate)")
    if server.tls_cert_file:
        warning = validity_warning(Path(server.tls_cert_file), now or dt.datetime.now(dt.UTC))
        if warning:
            out.append(f"server.tls_cert_file: {warning}")
    return out


def _check_paths(cfg: ApplianceConfig, base: Path, problems: _Problems) -> None:
    ls = cfg.llama_server
    binary = _resolve(base, ls.binary)
    prefixes = [_resolve(base, p) for p in ls.allowed_binary_prefixes]
    if not prefixes:
        problems.add("llama_server.allowed_binary_prefixes", "must name at least one directory")
    elif not any(binary.is_relative_to(p) for p in prefixes):
        problems.add(
            "llama_server.binary",
            f"{binary} (canonical path) is outside llama_server.allowed_binary_prefixes "
            f"({', '.join(str(p) for p in prefixes)})",
        )
    if not binary.is_file():
        problems.add("llama_server.binary", f"{binary} does not exist (build it with `appliance install-llama-server`)")
    models_dir = _resolve(base, ls.models_dir)
    if not models_dir.is_dir():
        problems.add("llama_server.models_dir", f"{models_dir} is not a directory")
    for i, m in enumerate(cfg.models):
        for key in ("file", "mmproj", "chat_template"):
            text = getattr(m, key)
            if not text or (key == "chat_template" and not is_template_file(text)):
                continue
            path = _resolve(models_dir, text)
            if not path.is_relative_to(models_dir):
                problems.add(f"models[{i}].{key}", f"{path} (symlinks followed) is outside models_dir {models_dir}")
            elif not path.is_file():
                problems.add(f"models[{i}].{key}", f"{path} does not exist (install it with `appliance install-model`)")


def _check_models(cfg: ApplianceConfig, problems: _Problems) -> None:
    if not cfg.models:
        problems.add("models", "configure at least one [[models]] entry")
    seen: dict[str, str] = {}
    for i, m in enumerate(cfg.models):
        key = f"models[{i}]"
        for j, name in enumerate((m.name, *m.aliases)):
            where = f"{key}.name" if j == 0 else f"{key}.aliases[{j - 1}]"
            if not name:
                problems.add(where, "must not be empty")
            elif name in seen:
                problems.add(where, f"{name!r} is already used by {seen[name]}")
            elif j == 0 and is_pattern(name):
                problems.add(where, f"{name!r}: a model's name cannot be a pattern (patterns go in aliases)")
            elif is_pattern(name) and (reason := _pattern_problem(name)):
                problems.add(where, reason)
            else:
                seen[name] = where
        if m.kind not in KINDS:
            problems.add(f"{key}.kind", f"must be one of {', '.join(KINDS)}, got {m.kind!r}")
        if m.pooling not in POOLINGS:
            problems.add(f"{key}.pooling", f"must be one of {', '.join(POOLINGS)}, got {m.pooling!r}")
        for attr, low in (("ctx_size", 1), ("threads", 1), ("parallel", 1), ("gpu_layers", 0)):
            if getattr(m, attr) < low:
                problems.add(f"{key}.{attr}", f"must be at least {low}")
        if m.max_queue is not None and m.max_queue < 0:
            problems.add(f"{key}.max_queue", "must be 0 or more (0: never queue beyond parallel)")
        if m.chat_template and m.kind != "chat":
            problems.add(f"{key}.chat_template", f"only chat models use a chat template (this one is {m.kind})")
        elif m.chat_template and not is_template_file(m.chat_template) and m.chat_template not in CHAT_TEMPLATES:
            problems.add(f"{key}.chat_template", f"{m.chat_template!r} is neither a llama.cpp built-in template "
                         f"({', '.join(sorted(CHAT_TEMPLATES))}) nor a .jinja file under llama_server.models_dir")
        elif m.chat_template and not is_template_file(m.chat_template) and "--jinja" in m.extra_args:
            problems.add(f"{key}.extra_args", f"--jinja cannot be combined with the built-in template "
                         f"{m.chat_template!r} (built-ins use llama.cpp's own engine); use a .jinja file instead")
        for reason in check_extra_args(m.extra_args):
            problems.add(f"{key}.extra_args", reason)
        _check_memory_keys(cfg, m, key, problems)


def _pattern_problem(pattern: str) -> str | None:
    if pattern.count("[") != pattern.count("]"):
        return f"{pattern!r}: unbalanced [ ] in the pattern"
    if pattern.strip("*?") == "":
        return f"{pattern!r} matches every name: unknown models would never get 404 (name a prefix, e.g. gpt-*)"
    return None


def _check_memory_keys(cfg: ApplianceConfig, m: ModelConfig, key: str, problems: _Problems) -> None:
    if m.load not in LOADS:
        problems.add(f"{key}.load", f"must be one of {', '.join(LOADS)}, got {m.load!r}")
    if m.idle_unload_s < 0:
        problems.add(f"{key}.idle_unload_s", "must be 0 or more (0: unload only when the memory is needed)")
    elif m.idle_unload_s and not m.on_demand:
        problems.add(f"{key}.idle_unload_s", f"only on_demand models are unloaded (set load = \"{ON_DEMAND}\")")
    for j, device in enumerate(m.devices):
        if not _DEVICE.match(device):
            problems.add(f"{key}.devices[{j}]", f"{device!r} is not a llama.cpp device name (CPU, CUDA0, Vulkan0...)")
        elif device in m.devices[:j]:
            problems.add(f"{key}.devices[{j}]", f"{device!r} is listed twice")
    if m.devices and m.gpu_layers and not m.gpu_devices:
        problems.add(f"{key}.devices", f"gpu_layers = {m.gpu_layers} offloads layers, but devices names no GPU "
                     "device (add one, e.g. \"CUDA0\", or set gpu_layers = 0)")
    if m.devices and not m.gpu_layers and m.gpu_devices:
        problems.add(f"{key}.devices", f"{', '.join(m.gpu_devices)} would hold nothing with gpu_layers = 0 (offload "
                     "layers with gpu_layers, or list only CPU)")
    for device in m.memory_mib:
        if m.memory_devices and device not in m.memory_devices:
            problems.add(f"{key}.memory_mib.{device}", f"the model does not use {device} (its devices: "
                         f"{', '.join(m.memory_devices)})")
    if not cfg.memory:
        return
    if not m.memory_devices:
        problems.add(f"{key}.devices", f"gpu_layers = {m.gpu_layers} offloads layers: name the devices this model "
                     "uses (e.g. [\"CPU\", \"CUDA0\"]) so that its memory is counted against their budgets")
    for j, device in enumerate(m.memory_devices):
        if device not in cfg.memory:
            where = f"{key}.devices[{j}]" if m.devices else f"{key}.devices"
            problems.add(where, f"{device} has no budget in [memory] (known: {', '.join(sorted(cfg.memory))})")


def _parse_memory(raw: Any, problems: _Problems) -> dict[str, int]:
    """[memory]: MiB per device."""
    if not isinstance(raw, dict):
        problems.add("memory", "must be a table of MiB per device, e.g. [memory] CPU = 16384")
        return {}
    out: dict[str, int] = {}
    for device, mib in raw.items():
        if not _DEVICE.match(device):
            problems.add(f"memory.{device}", "is not a llama.cpp device name (CPU, CUDA0, Vulkan0...)")
        elif isinstance(mib, bool) or not isinstance(mib, int) or mib < 1:
            problems.add(f"memory.{device}", f"must be a whole number of MiB, at least 1, got {mib!r}")
        else:
            out[device] = mib
    return out


def _parse_memory_mib(raw: Any, devices: Any, gpu_layers: Any, key: str, problems: _Problems) -> dict[str, int]:
    """A model's ``memory_mib``: a number for a model on one device, or a table of MiB per device."""
    if not isinstance(devices, list) or not devices:
        devices = [CPU] if not gpu_layers else []
    if isinstance(raw, int) and not isinstance(raw, bool):
        if len(devices) != 1:
            problems.add(key, "a single number needs a model on one device; give a table per device, e.g. "
                         "{ CPU = 600, CUDA0 = 9000 }")
            return {}
        raw = {devices[0]: raw}
    if not isinstance(raw, dict):
        problems.add(key, f"must be a whole number of MiB or a table of MiB per device, got {raw!r}")
        return {}
    out: dict[str, int] = {}
    for device, mib in raw.items():
        if isinstance(mib, bool) or not isinstance(mib, int) or mib < 1:
            problems.add(f"{key}.{device}", f"must be a whole number of MiB, at least 1, got {mib!r}")
        else:
            out[str(device)] = mib
    return out


_CLIENT_INTS = ("max_concurrent", "requests_per_minute", "tokens_per_minute", "tokens_per_day")


def _parse_clients(raw: Any, problems: _Problems) -> dict[str, ClientPolicy]:
    """``[clients.<name>]`` tables; the values are checked here, the names and models by ``_check_clients``."""
    if not isinstance(raw, dict):
        problems.add("clients", "must be a table of [clients.<name>] tables")
        return {}
    known = ", ".join(sorted(("models", "weight", *_CLIENT_INTS)))
    out: dict[str, ClientPolicy] = {}
    for name, table in raw.items():
        prefix = f"clients.{name}"
        if not isinstance(table, dict):
            problems.add(prefix, "must be a table ([clients.<name>] with the client's limits)")
            continue
        values: dict[str, Any] = {}
        for key, value in table.items():
            where = f"{prefix}.{key}"
            if key == "models":
                if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
                    values[key] = tuple(value)
                else:
                    problems.add(where, f"must be a list of model names or aliases, got {value!r}")
            elif key in _CLIENT_INTS:
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    values[key] = value
                else:
                    problems.add(where, f"must be an integer, 0 or more (0: no limit), got {value!r}")
            elif key == "weight":
                if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1000:
                    values[key] = float(value)
                else:
                    problems.add(where, f"must be a number greater than 0 and at most 1000, got {value!r}")
            else:
                problems.add(where, f"unknown key (known keys: {known})")
        out[name] = ClientPolicy(**values)
    return out


def _check_clients(cfg: ApplianceConfig, base: Path, problems: _Problems) -> None:
    """Each section names a key of the keys file (or is ``default``), and each allowed model exists."""
    if not cfg.clients:
        return
    names: set[str] | None = set()
    if cfg.server.api_keys_file:
        try:
            names = set(read_api_keys(_resolve(base, cfg.server.api_keys_file)).values())
        except (OSError, ValueError):
            names = None  # reported under server.api_keys_file
    served = {n for m in cfg.models for n in (m.name, *m.aliases)}
    for name, policy in cfg.clients.items():
        if names is not None and name != DEFAULT_CLIENT and name not in names:
            where = (f"no key in {cfg.server.api_keys_file} is named {name!r}" if cfg.server.api_keys_file
                     else "no API keys are configured (server.api_keys_file), so no client has a name")
            problems.add(f"clients.{name}", f"{where}; known names: {', '.join(sorted(names)) or 'none'} "
                         f"(or {DEFAULT_CLIENT!r} for every key without a section)")
        for i, model in enumerate(policy.models or ()):
            if model not in served:
                problems.add(f"clients.{name}.models[{i}]",
                             f"{model!r} is not the name or an alias of a configured model "
                             f"(known: {', '.join(sorted(served))})")


def _check_ports(cfg: ApplianceConfig, problems: _Problems) -> None:
    ports: list[tuple[str, int]] = [("server.port", cfg.server.port), ("metrics.port", cfg.metrics.port)]
    ports += [(f"models[{i}].port", m.port) for i, m in enumerate(cfg.models)]
    owner: dict[int, str] = {}
    for key, port in ports:
        if not 1 <= port <= 65535:
            problems.add(key, f"{port} is not a TCP port (1-65535)")
        elif key.startswith("models") and port <= 1024:
            problems.add(key, f"{port} is a privileged port; llama-server ports must be above 1024")
        if port in owner:
            problems.add(key, f"{port} is already used by {owner[port]}")
        else:
            owner[port] = key


def _check_supervision(s: SupervisionConfig, problems: _Problems) -> None:
    if s.max_restarts < 0:
        problems.add("supervision.max_restarts", "must be 0 or more")
    if s.stable_uptime_s < 1:
        problems.add("supervision.stable_uptime_s", "must be at least 1")
    if s.backoff_initial_s <= 0 or s.backoff_max_s < s.backoff_initial_s:
        problems.add("supervision.backoff_max_s", "backoff_initial_s must be > 0 and backoff_max_s >= it")


def _check_events(e: EventsConfig, base: Path, problems: _Problems) -> None:
    for key in ("max_bytes", "batch_size", "queue_size"):
        if getattr(e, key) < 1:
            problems.add(f"events.{key}", "must be at least 1")
    if e.backups < 0:
        problems.add("events.backups", "must be 0 or more")
    if e.flush_interval_s <= 0:
        problems.add("events.flush_interval_s", "must be greater than 0")
    if e.url and not e.url.startswith(("http://", "https://")):
        problems.add("events.url", f"{e.url!r} must start with http:// or https://")
    if e.token_file:
        token = _resolve(base, e.token_file)
        try:
            if not token.read_text(encoding="utf-8").strip():
                problems.add("events.token_file", f"{token} is empty")
        except OSError as err:
            problems.add("events.token_file", f"cannot read {token}: {err.strerror}")


def parse(data: Mapping[str, Any], base: Path, source: Path | None = None, check_files: bool = True) -> ApplianceConfig:
    """Validate a parsed TOML document. Relative paths are taken from ``base`` (the config file's directory)."""
    problems = _Problems()
    sections: dict[str, tuple[type, Callable[..., Any]]] = {
        "server": (ServerConfig, ServerConfig),
        "metrics": (MetricsConfig, MetricsConfig),
        "llama_server": (LlamaServerConfig, LlamaServerConfig),
        "supervision": (SupervisionConfig, SupervisionConfig),
        "events": (EventsConfig, EventsConfig),
    }
    for key in data:
        if key not in (*sections, "models", "memory", "clients"):
            problems.add(key, f"unknown section (known: {', '.join([*sections, 'clients', 'memory', 'models'])})")
    built: dict[str, Any] = {}
    for name, (cls, make) in sections.items():
        built[name] = make(**_section(cls, data.get(name, {}), name, problems))
    models: list[ModelConfig] = []
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list):
        problems.add("models", "must be an array of tables ([[models]])")
        raw_models = []
    for i, raw in enumerate(raw_models):
        memory_mib: dict[str, int] = {}
        if isinstance(raw, dict) and "memory_mib" in raw:
            raw = dict(raw)
            memory_mib = _parse_memory_mib(raw.pop("memory_mib"), raw.get("devices"), raw.get("gpu_layers"),
                                           f"models[{i}].memory_mib", problems)
        values = _section(ModelConfig, raw, f"models[{i}]", problems, required=("name", "file", "port"))
        if all(k in values for k in ("name", "file", "port")):
            models.append(ModelConfig(**values, memory_mib=memory_mib))
    memory = _parse_memory(data.get("memory", {}), problems)
    clients = _parse_clients(data.get("clients", {}), problems)
    cfg = ApplianceConfig(models=tuple(models), source=source, memory=memory, clients=clients, **built)
    if len(models) == len(raw_models):
        _check_models(cfg, problems)
        _check_ports(cfg, problems)
        _check_clients(cfg, base, problems)
    _check_server(cfg.server, base, problems)
    _check_supervision(cfg.supervision, problems)
    _check_events(cfg.events, base, problems)
    if check_files:
        _check_paths(cfg, base, problems)
    if problems.items:
        raise ConfigError(problems.items)
    return _absolutize(cfg, base)


def _absolutize(cfg: ApplianceConfig, base: Path) -> ApplianceConfig:
    """Replace relative paths with canonical absolute ones so that every consumer sees the same files."""
    ls = cfg.llama_server
    models_dir = _resolve(base, ls.models_dir)

    def optional(text: str) -> str:
        return str(_resolve(base, text)) if text else ""

    return replace(
        cfg,
        server=replace(cfg.server, api_keys_file=optional(cfg.server.api_keys_file),
                       tls_cert_file=optional(cfg.server.tls_cert_file),
                       tls_key_file=optional(cfg.server.tls_key_file)),
        llama_server=LlamaServerConfig(
            binary=str(_resolve(base, ls.binary)),
            allowed_binary_prefixes=tuple(str(_resolve(base, p)) for p in ls.allowed_binary_prefixes),
            models_dir=str(models_dir),
        ),
        supervision=replace(cfg.supervision, runtime_dir=str(_resolve(base, cfg.supervision.runtime_dir)),
                            log_dir=str(_resolve(base, cfg.supervision.log_dir)) if cfg.supervision.log_dir else "",
                            state_dir=str(_resolve(base, cfg.supervision.state_dir))),
        events=replace(cfg.events, file=str(_resolve(base, cfg.events.file)) if cfg.events.file else "",
                       token_file=str(_resolve(base, cfg.events.token_file)) if cfg.events.token_file else ""),
        models=tuple(
            replace(m, file=str(_resolve(models_dir, m.file)),
                    mmproj=str(_resolve(models_dir, m.mmproj)) if m.mmproj else "",
                    chat_template=str(_resolve(models_dir, m.chat_template)) if is_template_file(m.chat_template)
                    else m.chat_template)
            for m in cfg.models
        ),
    )


def load(path: Path | str, check_files: bool = True) -> ApplianceConfig:
    """Read and validate ``path``; raises ConfigError listing every problem."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{p}: not valid TOML: {e}"]) from e
    return parse(data, p.resolve().parent, source=p.resolve(), check_files=check_files)
