"""Upstream clients: the appliance's own vs aiohttp vs httpx vs httpx on aiohttp's transport (httpx-aiohttp).

Usage: python -m bench.upstream_clients [--requests 3000] [--concurrency 1 16] [--rounds 1]

The question behind the appliance's upstream client (docs/design.md): what does one upstream request cost
the proxy's worker? Here each client sends --requests POSTs (a small chat completion request, JSON body and
Authorization header) to the nginx stub of bench.proxy_overhead, from this one process on uvloop, with --concurrency
tasks sharing one pooled client: ``appliance.proxy.upstream.Upstream`` as the proxy uses it, and the libraries
configured alike (unbounded pool, no decompression).
Measured: requests/s, and CPU microseconds per request of this process (time.process_time: user + system, all
threads), the cost a proxy worker would pay on top of its own. Clients run one after the other, --rounds times,
interleaved, each after 200 unmeasured requests; medians are reported, with ratios to aiohttp.

Needs the bench extra: pip install -e '.[bench]'. The stub listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version

import aiohttp
import httpx
import uvloop
from httpx_aiohttp import HttpxAiohttpClient

from appliance.proxy.upstream import Upstream
from bench.common import (
    AUTH_HEADERS,
    CHAT_PATH,
    CHAT_REQUEST,
    CHAT_RESPONSE,
    LOOPBACK,
    Children,
    base_parser,
    fmt,
    machine_summary,
    median,
    run_main,
    say,
    start_stub_nginx,
    table,
    temp_dir,
)

CLIENTS = ("appliance", "aiohttp", "httpx", "httpx-aiohttp")
WARMUP_REQUESTS = 200
BODY = CHAT_REQUEST.encode()
EXPECTED = len(CHAT_RESPONSE.encode())

Send = Callable[[], Awaitable[int]]  # one request; returns the body's length


@dataclass
class Point:
    rps: float
    cpu_us: float


async def _drive(send: Send, requests: int, concurrency: int) -> None:
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            if await send() != EXPECTED:
                raise RuntimeError("the stub's answer did not arrive whole")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _measure(client: str, url: str, requests: int, concurrency: int) -> Point:
    """Set the client up, warm it up, then time ``requests`` requests (the set-up and warm-up are not counted)."""
    if client == "appliance":
        upstream = Upstream()
        await upstream.start()

        async def send() -> int:
            r = await upstream.send("POST", url, BODY, AUTH_HEADERS)
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
            return len(body)

        close: Callable[[], Awaitable[None]] = upstream.close
    elif client == "aiohttp":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

        async def send() -> int:
            async with session.post(url, data=BODY, headers=AUTH_HEADERS) as r:
                r.raise_for_status()
                return len(await r.read())

        close = session.close
    else:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
        cls = HttpxAiohttpClient if client == "httpx-aiohttp" else httpx.AsyncClient
        hx = cls(limits=limits, timeout=None)

        async def send() -> int:
            r = await hx.post(url, content=BODY, headers=AUTH_HEADERS)
            r.raise_for_status()
            return len(r.content)

        close = hx.aclose
    try:
        await _drive(send, WARMUP_REQUESTS, concurrency)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await _drive(send, requests, concurrency)
        cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
    finally:
        await close()
    return Point(requests / elapsed, cpu / requests * 1e6)


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per client and run (3000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16],
                        help="concurrent requests, one set of runs each (default 1 16)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every client this many times (default 1)")
    args = parser.parse_args()
    tmp = temp_dir("clients")
    say(f"work directory {tmp}")
    with Children() as kids:
        stub_port, _ = start_stub_nginx(kids, tmp / "stub")
        url = f"http://{LOOPBACK}:{stub_port}{CHAT_PATH}"
        print(machine_summary())
        print(f"{args.requests} requests per run, {args.rounds} round(s); aiohttp {aiohttp.__version__}, "
              f"httpx {httpx.__version__}, uvloop {version('uvloop')}")
        print()
        points: dict[tuple[str, int], list[Point]] = {}
        for c in args.concurrency:
            for r in range(args.rounds):
                for client in CLIENTS:
                    p = uvloop.run(_measure(client, url, args.requests, c))
                    points.setdefault((client, c), []).append(p)
                    say(f"c={c} round {r + 1}/{args.rounds} {client}: {p.rps:,.0f} req/s, {p.cpu_us:.0f} CPU us/req")
                    kids.check_alive()
        med = {k: Point(median(p.rps for p in v), median(p.cpu_us for p in v)) for k, v in points.items()}
        rows = []
        for c in args.concurrency:
            base = med[("aiohttp", c)]
            for client in CLIENTS:
                m = med[(client, c)]
                rows.append([client, str(c), fmt(m.rps, ",.0f"), fmt(m.cpu_us, ".0f"), fmt(m.rps / base.rps, ".2f"),
                             fmt(m.cpu_us / base.cpu_us, ".2f")])
        print(table(["client", "c", "req/s", "CPU us/req", "req/s vs aiohttp", "CPU/req vs aiohttp"], rows))
        print(machine_summary(load_only=True))
    say(f"stopped everything; logs were in {tmp}")
    return 0


if __name__ == "__main__":
    run_main(main)
