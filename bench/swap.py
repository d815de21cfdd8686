"""Models on demand: the cost of a load through the appliance, and of sharing memory between two models.

Usage: python -m bench.swap [--rounds 5] [--seconds 60] [--clients 4] [--max-tokens 16] [--residency 10]

Starts the whole appliance (`python -m appliance up`) on the installed llama-server and Gemma 3 270M registered under
two names (A and B), and measures, with the page cache warm (the file is read once first):

1. Cold start, --rounds times, alternating:
   direct     llama-server started by hand on the same file and flags (the launcher's own argv): process start ->
              /health 200 -> a streamed completion's first token
   appliance  a streamed completion for A while A is unloaded: request sent -> first token (the load included)
   Goal: appliance <= 1.1 x direct + 0.25 s (medians).
2. Shared memory, --seconds each: --clients clients, half of them sending to A and half to B back to back (the models'
   requests interleave), in two configurations of the same appliance:
   resident   both models loaded `always`
   on demand  both `on_demand`, with a CPU budget (memory_mib) that holds only one: the appliance takes turns
   Reported: requests/s, swaps per minute (loads), and each model's share of the answers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from appliance.config import load
from appliance.runtime.launcher import build_argv
from bench.common import (
    AUTH_HEADERS,
    BINARY,
    LOOPBACK,
    MODEL_FILE,
    MODELS,
    PYTHON,
    Children,
    appliance_config,
    base_parser,
    fmt,
    free_port,
    link_model,
    machine_summary,
    median,
    run_main,
    say,
    start_appliance_up,
    table,
    temp_dir,
)

PROMPT = "Write one sentence about the sea."


def model(name: str, load: str, threads: int) -> dict[str, Any]:
    return {"name": name, "file": MODEL_FILE, "kind": "chat", "port": free_port(), "ctx_size": 1024,
            "threads": threads, "parallel": 2, "max_queue": 64, "load": load, "memory_mib": 400}


def body(name: str, max_tokens: int, stream: bool) -> bytes:
    return json.dumps({"model": name, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()


async def first_token(session: aiohttp.ClientSession, url: str, data: bytes) -> float:
    """Seconds from sending a streamed request to its first token event."""
    t0 = time.perf_counter()
    async with session.post(url, data=data, headers=AUTH_HEADERS) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if line.startswith(b"data: {"):
                seconds = time.perf_counter() - t0
                async for _ in r.content:  # read to the end, so that the request completes
                    pass
                return seconds
    raise RuntimeError(f"{url}: the stream ended without a token")


async def direct_cold_start(argv: list[str], port: int, max_tokens: int) -> float:
    """llama-server started by hand: process start -> ready -> first token."""
    url = f"http://{LOOPBACK}:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {proc.returncode}")
                await asyncio.sleep(0.01)
            await first_token(session, url + "/v1/chat/completions", body("direct", max_tokens, True))
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)


def state(proxy: str, name: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{proxy}/health", timeout=5) as r:
        states: dict[str, Any] = json.load(r)["models"]
    return str(states[name]["state"])


def unload(config: Path, proxy: str, name: str) -> None:
    conf = Path(load(config, check_files=False).supervision.runtime_dir) / "supervisord.conf"
    subprocess.run([PYTHON, "-m", "supervisor.supervisorctl", "-c", str(conf), "stop", f"model-{name}"],
                   capture_output=True, check=True, timeout=60)
    deadline = time.monotonic() + 30
    while state(proxy, name) != "unloaded":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not show unloaded")
        time.sleep(0.05)


async def traffic(proxy: str, names: list[str], clients: int, seconds: float, max_tokens: int) -> dict[str, int]:
    """``clients`` clients back to back for ``seconds``, half on each model; answers per model."""
    done = {n: 0 for n in names}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client(name: str) -> None:
            data = body(name, max_tokens, False)
            while time.monotonic() < deadline:
                async with session.post(f"{proxy}/v1/chat/completions", data=data, headers=AUTH_HEADERS) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{name}: HTTP {r.status}")
                done[name] += 1

        await asyncio.gather(*(client(names[i % len(names)]) for i in range(clients)))
    return done


def loads(config: Path) -> int:
    status = Path(load(config, check_files=False).supervision.runtime_dir) / "lifecycle" / "status.json"
    try:
        return sum(int(m["loads"]) for m in json.loads(status.read_text())["models"].values())
    except (OSError, ValueError, KeyError):
        return 0


def run_appliance(kids: Children, tmp: Path, models: list[dict[str, Any]], sections: dict[str, dict[str, Any]],
                  name: str) -> tuple[Path, str]:
    (tmp / name).mkdir()
    link_model(tmp / name / "models")
    config, port = appliance_config(tmp / name, models, binary=BINARY, models_dir=tmp / name / "models",
                                    sections=sections)
    start_appliance_up(kids, config, tmp / name / "up.log", f"appliance up ({name})", port)
    proxy = f"http://{LOOPBACK}:{port}"
    return config, proxy


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="cold starts per path [%(default)s]")
    parser.add_argument("--seconds", type=float, default=60, help="traffic per configuration [%(default)s]")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients, half per model [%(default)s]")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer [%(default)s]")
    parser.add_argument("--residency", type=float, default=10, help="server.min_residency_s [%(default)s]")
    parser.add_argument("--threads", type=int, default=1, help="llama-server --threads per model [%(default)s]")
    args = parser.parse_args()
    uvloop.install()
    tmp = temp_dir("swap")
    (MODELS / MODEL_FILE).read_bytes()  # the page cache warm for every path
    timings = {"server": {"min_residency_s": args.residency, "load_timeout_s": 300}}
    on_demand = [model("A", "on_demand", args.threads), model("B", "on_demand", args.threads)]
    print(machine_summary())
    with Children() as kids:
        say("cold start: starting the appliance with A and B on demand, one at a time in memory")
        config, proxy = run_appliance(kids, tmp, on_demand, {**timings, "memory": {"CPU": 500}}, "on_demand")
        cfg = load(config)
        argv = build_argv(cfg, cfg.model("A"))
        direct_port = free_port()
        argv[argv.index("--port") + 1] = str(direct_port)
        cold: dict[str, list[float]] = {"direct": [], "appliance": []}

        async def appliance_cold() -> float:
            async with aiohttp.ClientSession() as session:
                return await first_token(session, f"{proxy}/v1/chat/completions", body("A", args.max_tokens, True))

        for r in range(args.rounds):
            cold["direct"].append(asyncio.run(direct_cold_start(argv, direct_port, args.max_tokens)))
            cold["appliance"].append(asyncio.run(appliance_cold()))
            unload(config, proxy, "A")
            say(f"round {r + 1}/{args.rounds}: direct {cold['direct'][-1]:.3f} s, appliance "
                f"{cold['appliance'][-1]:.3f} s")
            kids.check_alive()
        d, a = median(cold["direct"]), median(cold["appliance"])
        print("Cold start to first token (medians over rounds)")
        print(table(["path", "seconds", "vs direct"], [["direct", fmt(d, ".3f"), "1.00 x"],
                                                        ["appliance", fmt(a, ".3f"), fmt(a / d, ".2f") + " x"]]))
        print(f"goal: appliance <= 1.1 x direct + 0.25 s = {1.1 * d + 0.25:.3f} s: "
              f"{'met' if a <= 1.1 * d + 0.25 else 'NOT met'}")
        print()

        say(f"shared memory: {args.clients} clients for {args.seconds:g} s, on demand")
        before = loads(config)
        t0 = time.monotonic()
        served_od = asyncio.run(traffic(proxy, ["A", "B"], args.clients, args.seconds, args.max_tokens))
        elapsed_od = time.monotonic() - t0
        swaps = loads(config) - before
        kids.stop_all()

        say(f"shared memory: {args.clients} clients for {args.seconds:g} s, both resident")
        resident = [model("A", "always", args.threads), model("B", "always", args.threads)]
        config, proxy = run_appliance(kids, tmp, resident, timings, "resident")
        t0 = time.monotonic()
        served_res = asyncio.run(traffic(proxy, ["A", "B"], args.clients, args.seconds, args.max_tokens))
        elapsed_res = time.monotonic() - t0
        rps_od, rps_res = sum(served_od.values()) / elapsed_od, sum(served_res.values()) / elapsed_res
        print(f"Two models, {args.clients} clients (half on each), {args.max_tokens} tokens per answer, "
              f"min_residency_s {args.residency:g}")
        print(table(["configuration", "requests/s", "vs resident", "swaps/min", "answers A : B"], [
            ["both resident", fmt(rps_res, ".2f"), "1.00 x", "0", f"{served_res['A']} : {served_res['B']}"],
            ["on demand, one fits", fmt(rps_od, ".2f"), fmt(rps_od / rps_res, ".2f") + " x",
             fmt(swaps * 60 / elapsed_od, ".1f"), f"{served_od['A']} : {served_od['B']}"]]))
        print(machine_summary(load_only=True))
    say(f"stopped everything; logs were in {tmp}")
    return 0


if __name__ == "__main__":
    run_main(main)
