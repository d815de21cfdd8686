"""Streams: what the proxy adds to each SSE event, in delay and in CPU, direct vs the bare proxy vs the appliance.

Usage: python -m bench.streams [--seconds 8] [--streams 1 16] [--events 100] [--gap-ms 10]

The upstream (bench/sse_stub.py) streams --events chat-completion chunks --gap-ms apart and stamps each one with
time.monotonic_ns() just before writing it; the client (aiohttp on uvloop, in this process) stamps each event when its
line arrives. receive - send is the event's one-way delay through the path; since the stub and the client are the same
for every path, the proxy's addition is the delay through it minus the delay direct (compared as distributions: p50
and p99 of every event of the run). --streams clients each open streams back to back for --seconds.

The CPU cost is the proxy's processes' CPU time over the run (from /proc, as bench.proxy_overhead) divided by the
events relayed, less what they spend at rest (measured first): microseconds per SSE event, per-stream costs (connect,
headers, accounting) spread over --events.

Paths: direct (client -> stub), bare (bench/bare_proxy.py, the floor) and appliance (gunicorn -c GUNICORN_CONF,
2 workers, API keys on). Everything listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
import uvloop

from bench.common import (
    AUTH_HEADERS,
    CHAT_PATH,
    LOOPBACK,
    PYTHON,
    Children,
    appliance_config,
    base_parser,
    cpu_seconds,
    fmt,
    free_port,
    idle_cpu_per_s,
    machine_summary,
    percentile,
    run_main,
    say,
    start_appliance_proxy,
    start_bare_proxy,
    stub_model,
    table,
    temp_dir,
    wait_ok,
)

TARGETS = ("direct", "bare", "appliance")


@dataclass
class Run:
    delays_us: list[float]  # one-way delay of every event received
    streams: int
    cpu_us_per_event: float | None  # None for direct
    incomplete: int  # streams that ended without [DONE] or with another status than 200


async def _one_stream(session: aiohttp.ClientSession, url: str, body: bytes, delays: list[float]) -> bool:
    async with session.post(url, data=body, headers=AUTH_HEADERS) as resp:
        if resp.status != 200:
            return False
        async for line in resp.content:
            now = time.monotonic_ns()
            if line.startswith(b"data: {"):
                delays.append((now - json.loads(line[6:])["t"]) / 1000)
            elif line.startswith(b"data: [DONE]"):
                return True
    return False


async def _load(url: str, body: bytes, streams: int, seconds: float) -> tuple[list[float], int, int]:
    """``streams`` clients opening streams back to back until the deadline: (delays, streams done, incomplete)."""
    delays: list[float] = []
    done = incomplete = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            nonlocal done, incomplete
            while time.monotonic() < deadline:
                ok = await _one_stream(session, url, body, delays)
                done += 1
                incomplete += not ok

        await asyncio.gather(*(client() for _ in range(streams)))
    return delays, done, incomplete


def measure(url: str, body: bytes, streams: int, seconds: float, cpu_root: int | None, idle_per_s: float) -> Run:
    cpu0, t0 = cpu_seconds(cpu_root) if cpu_root is not None else 0.0, time.monotonic()
    delays, done, incomplete = uvloop.run(_load(url, body, streams, seconds))
    cpu = (cpu_seconds(cpu_root) - cpu0 - idle_per_s * (time.monotonic() - t0)
           if cpu_root is not None else None)
    per_event = cpu / len(delays) * 1e6 if cpu is not None and delays else None
    return Run(sorted(delays), done, per_event, incomplete)


def report(runs: dict[tuple[str, int], Run], levels: list[int]) -> None:
    rows = []
    for s in levels:
        direct = runs[("direct", s)]
        d50, d99 = percentile(direct.delays_us, 50), percentile(direct.delays_us, 99)
        for target in TARGETS:
            r = runs[(target, s)]
            p50, p99 = percentile(r.delays_us, 50), percentile(r.delays_us, 99)
            added = target != "direct"
            rows.append([target, str(s), str(r.streams), f"{len(r.delays_us):,}", fmt(p50, ".0f"), fmt(p99, ".0f"),
                         fmt(p50 - d50 if added else None, "+.0f"), fmt(p99 - d99 if added else None, "+.0f"),
                         fmt(r.cpu_us_per_event, ".0f"), str(r.incomplete)])
    print(table(["path", "streams", "done", "events", "delay p50 us", "p99 us", "added p50 us", "added p99 us",
                 "proxy CPU us/event", "incomplete"], rows))
    print()
    rows = []
    for s in levels:
        b, a = runs[("bare", s)], runs[("appliance", s)]
        cpu = (a.cpu_us_per_event / b.cpu_us_per_event
               if a.cpu_us_per_event is not None and b.cpu_us_per_event else None)
        rows.append([str(s), fmt(percentile(a.delays_us, 50) - percentile(b.delays_us, 50), "+.0f"),
                     fmt(percentile(a.delays_us, 99) - percentile(b.delays_us, 99), "+.0f"), fmt(cpu, ".2f")])
    print(table(["streams", "p50 app-bare us", "p99 app-bare us", "CPU/event app/bare"], rows))
    if any(r.incomplete for r in runs.values()):
        print("WARNING: some streams failed or ended early (incomplete column)")


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each run (default 8)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16],
                        help="concurrent streams, one set of runs each (default 1 16)")
    parser.add_argument("--events", type=int, default=100, help="events per stream (default 100)")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="gap between events, ms (default 10)")
    args = parser.parse_args()
    tmp = temp_dir("streams")
    say(f"work directory {tmp}")
    body = json.dumps({"model": "bench", "stream": True, "n": args.events, "gap_ms": args.gap_ms,
                       "messages": [{"role": "user", "content": "Hello"}]}).encode()
    with Children() as kids:
        say("starting the SSE stub, the bare proxy and the appliance proxy")
        stub_port = free_port()
        kids.start("SSE stub", [PYTHON, "-m", "bench.sse_stub", str(stub_port)], tmp / "sse_stub.log")
        wait_ok(kids, "SSE stub", "GET", f"http://{LOOPBACK}:{stub_port}/health")
        bare_port, bare = start_bare_proxy(kids, tmp, stub_port)
        config, app_port = appliance_config(tmp, [stub_model(stub_port)])
        appliance = start_appliance_proxy(kids, tmp, config, app_port)
        ports = {"direct": stub_port, "bare": bare_port, "appliance": app_port}
        roots = {"direct": None, "bare": bare.pid, "appliance": appliance.pid}
        urls = {t: f"http://{LOOPBACK}:{p}{CHAT_PATH}" for t, p in ports.items()}
        warm = json.dumps({"model": "bench", "stream": True, "n": 3, "gap_ms": 1}).encode()
        for target, url in urls.items():
            wait_ok(kids, target, "POST", url, warm, AUTH_HEADERS)
        say("measuring the proxies' CPU time at rest")
        idle = {t: idle_cpu_per_s(root) for t, root in roots.items() if root is not None}
        print(machine_summary())
        print("proxy CPU at rest (subtracted from each run): "
              + ", ".join(f"{t} {v * 1000:.1f} ms/s" for t, v in idle.items()))
        print(f"{args.events} events per stream, {args.gap_ms:g} ms apart; {args.seconds:g} s per run")
        print()
        runs: dict[tuple[str, int], Run] = {}
        for s in args.streams:
            for target in TARGETS:
                r = runs[(target, s)] = measure(urls[target], body, s, args.seconds, roots[target],
                                                   idle.get(target, 0.0))
                say(f"streams={s} {target}: {r.streams} streams, {len(r.delays_us):,} events, delay p50 "
                    f"{percentile(r.delays_us, 50):.0f} us, p99 {percentile(r.delays_us, 99):.0f} us"
                    + (f", {r.cpu_us_per_event:.0f} CPU us/event" if r.cpu_us_per_event is not None else ""))
                kids.check_alive()
        report(runs, args.streams)
        print(machine_summary(load_only=True))
    say(f"stopped everything; logs were in {tmp}")
    return 0


if __name__ == "__main__":
    run_main(main)
