"""What the proxy costs: the same requests direct to the upstream and through the appliance, side by side, as ratios.

Usage: .venv/bin/python -m bench.proxy_overhead [--seconds 5] [--concurrency 1 16] [--no-llama]
(uses wrk as the load generator when it is installed: apt-get install wrk)

Two upstreams are measured in one run:
- a stub llama-server (tests/stub_llama.py) answering a small chat completion: the proxy's own overhead, the number
  that matters for high-rate embedding traffic;
- the real llama-server with Gemma 3 270M serving embeddings (skipped with --no-llama or when setup has not run).
The proxy is the real thing: gunicorn with the appliance's uvicorn workers. On a 2-core machine the load generator
competes with the proxy for CPU; compare ratios from the same run only.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.e2e.conftest import BINARY, MODEL_FILE, MODELS
from tests.helpers import REPO, Proxy, free_port, stub_config, write_config

CHAT_BODY = b'{"model":"chat-a","messages":[{"role":"user","content":"hi"}]}'
EMBED_BODY = b'{"input":"The quick brown fox jumps over the lazy dog."}'


async def load(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[float, float, float]:
    """Closed-loop load: returns (requests per second, p50 ms, p99 ms)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_client() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url}: HTTP {r.status}")
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
"""


def wrk_load(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[float, float, float]:
    """The same measurement with wrk (a C load generator: less CPU taken from the proxy on a small machine)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % body.decode())
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "60s",
            "-s", f.name, url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    Path(f.name).unlink()

    def ms(token: str) -> float:
        unit = token.lstrip("0123456789.")
        return float(token[: len(token) - len(unit)]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))
    pct = {line.split()[0]: ms(line.split()[1]) for line in out.splitlines() if line.strip().startswith(("50%", "99%"))}
    if "Non-2xx" in out:
        raise RuntimeError(f"{url}: non-2xx answers\n{out}")
    return rps, pct["50%"], pct["99%"]


def start_stub(port: int) -> subprocess.Popen[bytes]:
    """The stub in its own process, so that it does not share a GIL with the load generator."""
    code = ("import time; from tests.stub_llama import StubLlama; "
            f"StubLlama({port}).start(); time.sleep(10**6)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("stub did not start")


def compare(label: str, direct: str, proxied: str, body: bytes, concurrencies: list[int], seconds: float) -> None:
    use_wrk = shutil.which("wrk") is not None
    for c in concurrencies:
        asyncio.run(load(direct, body, c, 0.5))  # warm both paths
        asyncio.run(load(proxied, body, c, 0.5))
        if use_wrk:
            d, p = wrk_load(direct, body, c, seconds), wrk_load(proxied, body, c, seconds)
        else:
            d, p = asyncio.run(load(direct, body, c, seconds)), asyncio.run(load(proxied, body, c, seconds))
        print(f"{label:<28} c={c:<3} direct {d[0]:8.0f} req/s p50 {d[1]:6.2f} ms p99 {d[2]:7.2f} ms | "
              f"appliance {p[0]:8.0f} req/s p50 {p[1]:6.2f} ms p99 {p[2]:7.2f} ms | "
              f"throughput ratio {p[0] / d[0]:.2f}, p50 +{p[1] - d[1]:.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-llama", action="store_true", help="skip the real llama-server")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    chat_port, embed_port = free_port(), free_port()
    procs = [start_stub(chat_port)]
    use_llama = not args.no_llama and BINARY.is_file() and (MODELS / MODEL_FILE).is_file()
    if use_llama:
        embed_port = free_port()
        argv = [str(BINARY), "--model", str(MODELS / MODEL_FILE), "--host", "127.0.0.1", "--port", str(embed_port),
                "--embeddings", "--pooling", "mean", "--threads", "1", "--parallel", "4", "--ctx-size", "2048",
                "--no-webui"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    else:
        procs.append(start_stub(embed_port))
    doc = stub_config(tmp, chat_port, embed_port)
    proxy = Proxy(write_config(tmp / "appliance.toml", doc), doc["server"]["port"])
    try:
        proxy.start(wait_ready=True)
        print(f"proxy: gunicorn, {doc['server']['workers']} uvicorn workers, aiohttp upstream client; "
              f"{args.seconds:g} s per point; load generator: {'wrk' if shutil.which('wrk') else 'aiohttp'}",
              flush=True)
        compare("stub chat completion", f"http://127.0.0.1:{chat_port}/v1/chat/completions",
                proxy.url + "/v1/chat/completions", CHAT_BODY, args.concurrency, args.seconds)
        if use_llama:
            compare("llama-server embeddings", f"http://127.0.0.1:{embed_port}/v1/embeddings",
                    proxy.url + "/v1/embeddings", EMBED_BODY, args.concurrency, args.seconds)
    finally:
        proxy.stop()
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
