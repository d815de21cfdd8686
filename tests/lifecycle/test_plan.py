"""The memory estimate against what llama-server really uses, and the GGUF header reader."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from appliance.config import ModelConfig
from appliance.lifecycle.plan import PlanError, estimate, read_header
from tests.e2e.conftest import BINARY, MODEL_FILE, MODELS
from tests.helpers import free_port

MODEL = str((MODELS / MODEL_FILE).resolve())


def test_the_header_reader_finds_the_default_models_shape() -> None:
    header = read_header(MODEL)
    assert header.fields["general.architecture"] == "gemma3"
    assert header.fields["gemma3.block_count"] == 18
    assert header.fields["tokenizer.ggml.tokens"] == 262144  # arrays as their length
    assert len(header.tensors) == 236
    # Every tensor's bytes add up to the file less its header.
    assert sum(size for _, size in header.tensors) <= os.path.getsize(MODEL)
    assert sum(size for _, size in header.tensors) > 0.9 * os.path.getsize(MODEL)


def test_a_file_that_is_not_gguf_is_a_plan_error(tmp_path: Path) -> None:
    for data in (b"", b"GGUF", b"not a model at all", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(data)
        with pytest.raises(PlanError, match="cannot read"):
            estimate(ModelConfig(name="m", file=str(bad), port=1))


def rss_after_one_request(ctx_size: int) -> int:
    """MiB resident in a llama-server started by hand on the default model, after it answered one request."""
    port = free_port()
    proc = subprocess.Popen([str(BINARY), "--model", MODEL, "--host", "127.0.0.1", "--port", str(port),
                             "--ctx-size", str(ctx_size), "--parallel", "2", "--threads", "2", "--n-gpu-layers", "0",
                             "--metrics", "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                       json={"prompt": "The capital of France is", "max_tokens": 16})
        assert r.status_code == 200
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) // 1024
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("ctx_size", [4096, 32768])
def test_the_estimate_is_within_25_percent_of_llama_servers_resident_memory(ctx_size: int) -> None:
    estimated = estimate(ModelConfig(name="m", file=MODEL, port=1, ctx_size=ctx_size, parallel=2)).mib["CPU"]
    measured = rss_after_one_request(ctx_size)
    assert 0.75 * measured <= estimated <= 1.25 * measured, (estimated, measured)


def test_offloaded_layers_move_weights_and_cache_to_the_gpu_devices() -> None:
    cpu_only = estimate(ModelConfig(name="m", file=MODEL, port=1, ctx_size=32768))
    full = estimate(ModelConfig(name="m", file=MODEL, port=1, ctx_size=32768, gpu_layers=99,
                                devices=("CPU", "Vulkan0")))
    half = estimate(ModelConfig(name="m", file=MODEL, port=1, ctx_size=32768, gpu_layers=9,
                                devices=("CPU", "Vulkan0")))
    split = estimate(ModelConfig(name="m", file=MODEL, port=1, ctx_size=32768, gpu_layers=99,
                                 devices=("CPU", "CUDA0", "CUDA1")))
    # Token embeddings stay on the host; every block, the cache and (tied) output go to the GPU.
    assert full.mib["CPU"] < cpu_only.mib["CPU"] < full.mib["CPU"] + full.mib["Vulkan0"]
    assert half.mib["CPU"] > full.mib["CPU"] and half.mib["Vulkan0"] < full.mib["Vulkan0"]
    assert split.mib["CUDA0"] == split.mib["CUDA1"] and split.mib["CUDA0"] < full.mib["Vulkan0"]
    quantized = estimate(ModelConfig(name="m", file=MODEL, port=1, ctx_size=32768,
                                     extra_args=("--cache-type-k", "q8_0", "--cache-type-v", "q8_0")))
    assert quantized.mib["CPU"] < cpu_only.mib["CPU"]
