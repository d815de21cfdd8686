"""Proxy overhead: the same small chat completion direct, through nginx, a bare Falcon proxy and the appliance.

Usage: python -m bench.proxy_overhead [--seconds 5] [--concurrency 1 16 64] [--rounds 1]

One fast upstream for every path: nginx itself, answering a fixed chat completion (a Python stub would add its own
cost to every path and hide the proxy's). The load generator is wrk with one thread, POSTing a JSON body with an
Authorization header to /v1/chat/completions, with N connections (closed loop). Paths measured:

  direct     wrk -> stub
  nginx      wrk -> nginx reverse proxy (2 workers, pooled upstream connections) -> stub: a C proxy for reference
  bare       wrk -> bench/bare_proxy.py (Falcon + aiohttp, nothing else) -> stub: the floor of this Python stack
  appliance  wrk -> the appliance proxy (gunicorn -c GUNICORN_CONF, 2 workers, API keys on) -> stub

The two Python proxies run under gunicorn with the same settings (2 uvicorn workers, uvloop, httptools). Reported per
path and concurrency: requests/s, p50/p99 latency, p50 added over direct, and the CPU seconds the proxy's processes
(arbiter + workers, or nginx master + workers) spent per 1,000 requests, read from /proc before and after each run,
less what they spend at rest (measured first: heartbeats, readiness polls).
Then the ratios, and whether the performance goals hold: at c=16 the appliance serves >= 0.85 x the bare proxy's
requests/s, and at c=1 it adds <= 0.15 ms to the median latency over direct.

Everything listens on 127.0.0.1 and is stopped at the end. Compare figures from the same run only: on a small machine
the load generator, the stub and the proxy share the cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.bare_proxy import CLIENTS
from bench.common import (
    AUTH_HEADERS,
    CHAT_PATH,
    CHAT_REQUEST,
    LOOPBACK,
    Children,
    appliance_config,
    base_parser,
    check_same_answer,
    fmt,
    idle_cpu_per_s,
    machine_summary,
    measured_wrk,
    median,
    run_main,
    say,
    start_appliance_proxy,
    start_bare_proxy,
    start_nginx_proxy,
    start_stub_nginx,
    stub_model,
    table,
    temp_dir,
    wrk_script,
)

TARGETS = ("direct", "nginx", "bare", "appliance")
GOAL_THROUGHPUT = 0.85  # appliance / bare requests per second at c=16
GOAL_ADDED_P50_MS = 0.15  # appliance p50 minus direct p50 at c=1


@dataclass
class Point:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_per_1k: float | None  # CPU seconds of the proxy's processes per 1,000 requests; None for direct
    errors: int


def summarize(points: list[Point]) -> Point:
    """The median of each figure over the rounds."""
    cpus = [p.cpu_per_1k for p in points if p.cpu_per_1k is not None]
    return Point(median(p.rps for p in points), median(p.p50_ms for p in points), median(p.p99_ms for p in points),
                 median(cpus) if cpus else None, sum(p.errors for p in points))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def report(results: dict[tuple[str, int], Point], concurrency: list[int]) -> None:
    rows = []
    for c in concurrency:
        direct = results[("direct", c)]
        for target in TARGETS:
            p = results[(target, c)]
            added = None if target == "direct" else p.p50_ms - direct.p50_ms
            rows.append([target, str(c), fmt(p.rps, ",.0f"), fmt(p.p50_ms, ".3f"), fmt(p.p99_ms, ".3f"),
                         fmt(added, "+.3f"), fmt(p.cpu_per_1k, ".3f"), str(p.errors)])
    print(table(["path", "c", "req/s", "p50 ms", "p99 ms", "p50 +ms vs direct", "proxy CPU s/1k req", "errors"],
                rows))
    print()
    rows = []
    for c in concurrency:
        d, n, b, a = (results[(t, c)] for t in TARGETS)
        rows.append([str(c), fmt(ratio(a.rps, b.rps), ".2f"), fmt(ratio(a.rps, n.rps), ".2f"),
                     fmt(ratio(a.rps, d.rps), ".2f"), fmt(ratio(b.rps, d.rps), ".2f"),
                     fmt(ratio(a.cpu_per_1k, b.cpu_per_1k), ".2f"), fmt(ratio(a.cpu_per_1k, n.cpu_per_1k), ".2f"),
                     fmt(a.p50_ms - b.p50_ms, "+.3f")])
    print(table(["c", "req/s app/bare", "app/nginx", "app/direct", "bare/direct", "CPU/req app/bare",
                 "CPU/req app/nginx", "p50 app-bare ms"], rows))
    print()
    if 16 in concurrency:
        r = ratio(results[("appliance", 16)].rps, results[("bare", 16)].rps)
        verdict = "met" if r is not None and r >= GOAL_THROUGHPUT else "NOT met"
        print(f"goal: c=16 throughput >= {GOAL_THROUGHPUT} x bare: {fmt(r, '.2f')} x -> {verdict}")
    else:
        print("goal: c=16 throughput: not measured (add 16 to --concurrency)")
    if 1 in concurrency:
        added = results[("appliance", 1)].p50_ms - results[("direct", 1)].p50_ms
        verdict = "met" if added <= GOAL_ADDED_P50_MS else "NOT met"
        print(f"goal: c=1 added p50 <= {GOAL_ADDED_P50_MS} ms over direct: {added:+.3f} ms -> {verdict}")
    else:
        print("goal: c=1 added p50: not measured (add 1 to --concurrency)")
    if any(p.errors for p in results.values()):
        print("WARNING: some requests failed (errors column): the figures of those rows are not comparable")


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration of each measured run (default 5)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64],
                        help="wrk connections, one set of runs each (default 1 16 64)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unmeasured load before each run, 0 for none (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every path this many times, interleaved; medians are reported (default 1)")
    parser.add_argument("--bare-client", choices=CLIENTS, default="aiohttp",
                        help="upstream client of the bare proxy (default aiohttp, the appliance's)")
    args = parser.parse_args()
    tmp = temp_dir("overhead")
    say(f"work directory {tmp}")
    with Children() as kids:
        say("starting the nginx stub, the nginx proxy, the bare proxy and the appliance proxy")
        stub_port, _ = start_stub_nginx(kids, tmp / "stub")
        nginx_port, nginx = start_nginx_proxy(kids, tmp / "nginx", stub_port)
        bare_port, bare = start_bare_proxy(kids, tmp, stub_port, args.bare_client)
        config, app_port = appliance_config(tmp, [stub_model(stub_port)])
        appliance = start_appliance_proxy(kids, tmp, config, app_port)
        ports = {"direct": stub_port, "nginx": nginx_port, "bare": bare_port, "appliance": app_port}
        roots = {"direct": None, "nginx": nginx.pid, "bare": bare.pid, "appliance": appliance.pid}
        urls = {t: f"http://{LOOPBACK}:{port}{CHAT_PATH}" for t, port in ports.items()}
        check_same_answer(kids, urls, urls["direct"])
        script = wrk_script(tmp, CHAT_REQUEST, AUTH_HEADERS)
        say("measuring the proxies' CPU time at rest")
        idle = {t: idle_cpu_per_s(root) for t, root in roots.items() if root is not None}
        print(machine_summary())
        print("proxy CPU at rest (subtracted from each run): "
              + ", ".join(f"{t} {v * 1000:.1f} ms/s" for t, v in idle.items()))
        print(f"wrk -t1, {args.seconds} s per run, {args.warmup} s warm-up, {args.rounds} round(s); "
              f"bare proxy client: {args.bare_client}")
        print()
        points: dict[tuple[str, int], list[Point]] = {}
        for c in args.concurrency:
            for r in range(args.rounds):
                for target in TARGETS:
                    w, per_1k = measured_wrk(urls[target], script, c, args.seconds, args.warmup, roots[target],
                                             idle.get(target, 0.0))
                    points.setdefault((target, c), []).append(Point(w.rps, w.p50_ms, w.p99_ms, per_1k, w.errors))
                    say(f"c={c} round {r + 1}/{args.rounds} {target}: {w.rps:,.0f} req/s, p50 {w.p50_ms:.3f} ms, "
                        f"p99 {w.p99_ms:.3f} ms" + (f", {per_1k:.3f} CPU s/1k req" if per_1k is not None else "")
                        + (f", {w.errors} errors" if w.errors else ""))
                    kids.check_alive()
        report({k: summarize(v) for k, v in points.items()}, args.concurrency)
        print(machine_summary(load_only=True))
    say(f"stopped everything; logs were in {tmp}")
    return 0


if __name__ == "__main__":
    run_main(main)
