"""Memory planning: each model's footprint per device, estimated from its GGUF file, against [memory]'s budgets.

The estimate follows what llama.cpp allocates when it loads a model:
- the weights, split by layer: the last ``gpu_layers`` blocks go to the GPU devices (evenly, llama.cpp's default split
  is close to that on equal devices), the output layer too once every block is offloaded, the token embeddings stay in
  host memory;
- the KV cache for ``ctx_size`` tokens in the cache types of ``extra_args`` (f16 by default); sliding-window
  layers keep only ``parallel`` windows plus one batch unless ``--swa-full``; it sits with its layer unless
  ``--no-kv-offload``;
- the compute buffers, which grow with the batch, the vocabulary and the context;
- on the host, the process itself.
The file is read with the types and quantization sizes of llama.cpp's own ``gguf`` package. ``memory_mib`` replaces
the estimate where an operator knows better.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from typing import Any

from appliance.config import CPU, ApplianceConfig, ConfigError, ModelConfig

MiB = 1024 * 1024
#: The llama-server process in host memory beyond its buffers (code, libraries, heap, HTTP server, tokenizer).
PROCESS_MIB = 60
#: Bytes per KV cache element by cache type (``--cache-type-k/v``); block types carry a scale per 32 elements.
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
            "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
#: Layers that use a sliding window, by architecture: every layer whose index modulo the period is below the count.
#: An architecture not listed here is estimated with a full cache on every layer (never too low).
SWA_PATTERN = {"gemma3": (6, 5), "gemma2": (2, 1), "cohere2": (4, 3), "gemma3n": (5, 4)}
_BLOCK = re.compile(r"^blk\.(\d+)\.")
DEFAULT_UBATCH = 512


class PlanError(Exception):
    """A model file that cannot be read as GGUF."""


@dataclass(frozen=True)
class Footprint:
    """MiB per device; ``estimated`` is False where memory_mib gave the figures."""

    mib: dict[str, int]
    estimated: bool = True
    detail: str = ""


def _flag(args: tuple[str, ...], names: tuple[str, ...], default: str) -> str:
    value = default
    for i, token in enumerate(args):
        flag, eq, inline = token.partition("=")
        if flag in names:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else default)
    return value


@dataclass
class GGUFHeader:
    """What a plan needs from a GGUF file: its metadata (arrays as their length) and each tensor's name and bytes."""

    fields: dict[str, Any]
    tensors: list[tuple[str, int]]


def read_header(path: str) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file, read with the gguf package's types and quantization sizes.

    Why not ``gguf.GGUFReader``: it decodes every array element into numpy objects, which for a 262,144-token
    vocabulary took 7 to 15 s per file here, and ``check-config`` reads every model. This walk skips array contents
    (a plan needs only their length) and reads the same file in well under a second."""
    import gguf  # imported only where a plan is made, never by the proxy workers

    T = gguf.GGUFValueType
    scalars = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
               T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            value = struct.unpack_from(fmt, data, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            pos += n
            return bytes(data[pos - n:pos]).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            nonlocal pos
            if kind == T.STRING:
                return string()
            if kind == T.ARRAY:
                item, count = take("<I"), take("<Q")
                if item == T.STRING:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
                elif item in scalars:
                    pos += count * struct.calcsize(scalars[T(item)])
                else:
                    for _ in range(count):
                        value(item)
                return count
            return take(scalars[T(kind)])

        if take("<I") != gguf.GGUF_MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        if take("<I") not in (2, 3):
            raise ValueError("unsupported GGUF version")
        n_tensors, n_fields = take("<Q"), take("<Q")
        fields = {}
        for _ in range(n_fields):
            key = string()
            fields[key] = value(take("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            elements = 1
            for _ in range(take("<I")):
                elements *= take("<Q")
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(take("<I"))]
            take("<Q")  # offset
            tensors.append((name, elements // block * size))
    return GGUFHeader(fields, tensors)


def estimate(model: ModelConfig) -> Footprint:
    """The footprint of ``model`` from its GGUF file, per device of ``model.memory_devices``."""
    try:
        header = read_header(model.file)
    except Exception as e:  # a truncated or foreign file fails in many ways (struct.error, ValueError, KeyError...)
        raise PlanError(f"cannot read {model.file} as GGUF: {e or type(e).__name__}") from e

    def field(key: str, default: int = 0) -> int:
        return int(header.fields.get(key, default))

    arch = str(header.fields.get("general.architecture", ""))
    n_layer = field(f"{arch}.block_count")
    n_embd = field(f"{arch}.embedding_length")
    n_head = max(field(f"{arch}.attention.head_count", 1), 1)
    n_head_kv = field(f"{arch}.attention.head_count_kv", n_head)
    k_len = field(f"{arch}.attention.key_length", n_embd // n_head)
    v_len = field(f"{arch}.attention.value_length", n_embd // n_head)
    window = field(f"{arch}.attention.sliding_window")
    n_vocab = field("tokenizer.ggml.tokens")

    offloaded = min(model.gpu_layers, n_layer)
    first_gpu_layer = n_layer - offloaded
    host = gpu = 0.0
    embd_bytes = 0
    has_output = False
    for name, size in header.tensors:
        block = _BLOCK.match(name)
        if block is not None:
            if int(block[1]) >= first_gpu_layer:
                gpu += size
            else:
                host += size
            continue
        if name.startswith("token_embd."):
            embd_bytes = size
            host += size  # the input layer always stays in host memory
            continue
        has_output |= name == "output.weight"
        if model.gpu_layers > n_layer:
            gpu += size
        else:
            host += size
    if model.gpu_layers > n_layer and not has_output:
        gpu += embd_bytes  # tied embeddings: the output layer is a copy of them on the GPU

    args = model.extra_args
    per_elt_k = KV_BYTES.get(_flag(args, ("--cache-type-k", "-ctk"), "f16"), 2.0)
    per_elt_v = KV_BYTES.get(_flag(args, ("--cache-type-v", "-ctv"), "f16"), 2.0)
    ubatch = int(_flag(args, ("--ubatch-size", "-ub"), str(DEFAULT_UBATCH)))
    period, swa_count = SWA_PATTERN.get(arch, (1, 0)) if window and "--swa-full" not in args else (1, 0)
    kv_host = kv_gpu = 0.0
    for layer in range(n_layer):
        cells = model.ctx_size
        if layer % period < swa_count:
            cells = min(model.ctx_size, window * model.parallel + ubatch)
        layer_bytes = cells * n_head_kv * (k_len * per_elt_k + v_len * per_elt_v)
        if layer >= first_gpu_layer and "--no-kv-offload" not in args and "-nkvo" not in args:
            kv_gpu += layer_bytes
        else:
            kv_host += layer_bytes
    # The compute graph of one batch: activations of ubatch tokens, attention scores over the context, the logits.
    compute = 4 * ubatch * (4 * n_embd + n_head * min(model.ctx_size, 4096)) + 4 * n_vocab * model.parallel
    host_compute = compute if offloaded < n_layer else 4 * ubatch * n_embd * 2
    gpu_compute = compute if offloaded else 0

    host_mib = (host + kv_host + host_compute) / MiB + PROCESS_MIB
    gpu_mib = (gpu + kv_gpu + gpu_compute) / MiB
    mib: dict[str, int] = {}
    gpus = model.gpu_devices
    for device in model.memory_devices:
        if device == CPU:
            mib[device] = math.ceil(host_mib)
        elif gpus:
            mib[device] = math.ceil(gpu_mib / len(gpus))
    detail = (f"weights {(host + gpu) / MiB:.0f} MiB, KV cache {(kv_host + kv_gpu) / MiB:.0f} MiB, "
              f"compute {(host_compute + gpu_compute) / MiB:.0f} MiB")
    return Footprint(mib, True, detail)


def footprint(model: ModelConfig) -> Footprint:
    """``memory_mib`` where given (every device of the model), else the estimate, with memory_mib's devices put in."""
    if model.memory_mib and set(model.memory_mib) >= set(model.memory_devices):
        return Footprint(dict(model.memory_mib), False, "memory_mib")
    found = estimate(model)
    if not model.memory_mib:
        return found
    return Footprint({**found.mib, **model.memory_mib}, True, found.detail + "; memory_mib for "
                     + ", ".join(sorted(model.memory_mib)))


def footprints(cfg: ApplianceConfig) -> dict[str, Footprint]:
    """Every model's footprint, checked (``checked``) when budgets are set; without budgets a file that cannot be
    estimated is no error: it counts for nothing."""
    return checked(cfg) if cfg.memory else {m.name: _lenient(m) for m in cfg.models}


def _lenient(model: ModelConfig) -> Footprint:
    try:
        return footprint(model)
    except PlanError as e:
        return Footprint({}, True, f"no estimate: {e}")


def checked(cfg: ApplianceConfig) -> dict[str, Footprint]:
    """Every model's footprint, once the plan is known to work; raises ConfigError naming the model, the device and
    the figures otherwise (``appliance check-config``, ``reload`` and ``up`` refuse such a config)."""
    if not cfg.memory:
        return footprints(cfg)
    found: dict[str, Footprint] = {}
    unreadable = []
    for i, m in enumerate(cfg.models):
        try:
            found[m.name] = footprint(m)
        except PlanError as e:
            unreadable.append(f"models[{i}].file: {e} (set memory_mib, or fix the file)")
    if unreadable:
        raise ConfigError(unreadable)
    trouble = problems(cfg, found)
    if trouble:
        raise ConfigError(trouble)
    return found


def fits(need: dict[str, int], used: dict[str, int], budget: dict[str, int]) -> bool:
    """Whether ``need`` fits beside ``used`` on every device that has a budget."""
    return all(used.get(d, 0) + mib <= budget[d] for d, mib in need.items() if d in budget)


def add(total: dict[str, int], part: dict[str, int], sign: int = 1) -> None:
    for device, mib in part.items():
        total[device] = total.get(device, 0) + sign * mib


def problems(cfg: ApplianceConfig, fps: dict[str, Footprint]) -> list[str]:
    """``key: reason`` for a plan that cannot work: always models that do not fit together, a model that cannot fit
    even alone."""
    out: list[str] = []
    if not cfg.memory:
        return out
    for i, m in enumerate(cfg.models):
        for device, mib in fps[m.name].mib.items():
            budget = cfg.memory.get(device)
            if budget is not None and mib > budget:
                out.append(f"models[{i}]: {m.name} needs {mib} MiB on {device} ({fps[m.name].detail}), more than its "
                           f"whole budget of {budget} MiB (memory.{device}); lower ctx_size or parallel, offload "
                           "differently, or raise the budget")
    used: dict[str, int] = {}
    for m in cfg.models:
        if not m.on_demand:
            add(used, fps[m.name].mib)
    for device, total in sorted(used.items()):
        budget = cfg.memory.get(device)
        if budget is not None and total > budget:
            names = ", ".join(f"{m.name} {fps[m.name].mib[device]} MiB" for m in cfg.models
                              if not m.on_demand and device in fps[m.name].mib)
            out.append(f"memory.{device}: the always-loaded models need {total} MiB together ({names}), more than "
                       f"the budget of {budget} MiB; make some of them load = \"on_demand\", or raise the budget")
    return out


def describe(cfg: ApplianceConfig, fps: dict[str, Footprint]) -> list[str]:
    """The plan as ``appliance check-config`` prints it."""
    lines = []
    if cfg.memory:
        lines.append("memory budgets: " + ", ".join(f"{d} {mib} MiB" for d, mib in sorted(cfg.memory.items())))
    else:
        lines.append("memory budgets: none ([memory] not set): models are never unloaded to make room")
    resident: dict[str, int] = {}
    for m in cfg.models:
        fp = fps[m.name]
        where = ", ".join(f"{d} {mib} MiB" for d, mib in fp.mib.items()) or "no device counted"
        how = "always loaded" if not m.on_demand else "on demand" + (
            f", unloaded after {m.idle_unload_s:g} s idle" if m.idle_unload_s else "")
        source = fp.detail if fp.estimated else "memory_mib"
        lines.append(f"  {m.name}: {where} ({how}; {source})")
        if not m.on_demand:
            add(resident, fp.mib)
    lines.append("resident from the start: " + (", ".join(m.name for m in cfg.models if not m.on_demand) or "none")
                 + ("; " + ", ".join(f"{d} {mib} of {cfg.memory[d]} MiB" for d, mib in sorted(resident.items())
                                    if d in cfg.memory) if cfg.memory and resident else ""))
    return lines
