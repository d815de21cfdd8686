"""Clients: what the per-client policies cost on the request path, and what fair sharing gives a client next to a flood.

Usage: python -m bench.clients [--rounds 5] [--tries 3] [--seconds 4] [--flood 16] [--singles 5]
                               [--only policies|neighbour]

1. Policies (the nginx stub of bench.proxy_overhead as the upstream; wrk with one thread). Two appliance proxies run
   side by side in front of the same stub, with the same config except one thing:

     without   API keys, no [clients] section: a request pays one dictionary lookup for its client's policy
     with      [clients.bench] for the benchmark's key, a policy that makes every check run and never refuses: the
               model in its `models` allow-list, max_concurrent, requests_per_minute (10^9: the window counts 60 s)
               and tokens_per_minute far above the run, tokens_per_day huge; every request is counted in flight and
               in the windows after their check, carries the six rate-limit headers, and its tokens are charged to
               the windows when it ends

   The stub model has `parallel` 64, above every concurrency: the admission queue (which both configs share) never
   holds a request, so what differs is the policies alone. Each round starts two new proxies (one process can run a
   few per cent faster or slower than an identical one for its whole life) and alternates the order (without, with;
   then with, without) at each concurrency, so the machine's drift cancels out of each round's ratio. Each proxy gets
   --tries wrk runs per concurrency and round, alternating with the other's, and its best run counts: the kernel
   spreads a run's connections over the proxy's two workers as they connect, a spread like 12/4 costs up to 30 % of
   the throughput, and it only ever costs, so the best run is the proxy's own speed. Reported: requests/s, p50/p99,
   the proxy's CPU seconds per 1,000 requests (less its rate at rest), the medians of the rounds' ratios
   with/without, and the goal: at c=16 the policies keep >= 0.95 x the throughput.

2. Noisy neighbour (the real model: `python -m appliance up` with the installed llama-server and Gemma 3 270M, one
   chat model with --parallel slots, max_queue 64). Two keys, `flood` and `single`. The flood keeps --flood streamed
   chat completions in flight at all times; the single client sends one (the same request: fixed prompt, temperature
   0, ignore_eos, --max-tokens tokens) --interval seconds after its previous one ended, --singles times. Its latency
   (request sent to last byte) is measured three ways: with no flood (the baseline, direct and through the appliance,
   interleaved), with the flood straight to llama-server (first come, first served: it waits behind the whole flood)
   and with both through the appliance (its admission queue hands the next free slot to the client whose turn it is:
   about one generation); so is its wait for its first token, in generations (a flood request's first token to last:
   a generation as the model runs it next to the others), with the goal: at most 1.5 with fair sharing. The flood's
   tokens/s (its token events received in the same --window seconds from the single client's first request, both
   ways; longer when the single client's requests straight to llama-server take longer) says whether fairness costs
   the flood throughput; with every single request inside the window both ways, the single client's work in it is the
   same, and so is what is left for the flood unless the proxy loses some.

Everything listens on 127.0.0.1 and is stopped at the end. Compare figures from the same run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.common import (
    AUTH_HEADERS,
    BINARY,
    CHAT_PATH,
    CHAT_REQUEST,
    LOOPBACK,
    MODEL_FILE,
    MODELS,
    STUB_PARALLEL,
    Children,
    appliance_config,
    base_parser,
    check_same_answer,
    fmt,
    free_port,
    idle_cpu_per_s,
    link_model,
    machine_summary,
    measured_wrk,
    median,
    run_main,
    say,
    start_appliance_proxy,
    start_appliance_up,
    start_stub_nginx,
    stub_model,
    table,
    temp_dir,
    wrk_script,
)

GOAL_THROUGHPUT = 0.95  # with / without policies, requests per second at c=16
GOAL_WAIT = 1.5  # the single client's median wait for its first token next to the flood, in generations
CONFIGS = ("without", "with")
# Every check runs, none refuses: limits far above anything a run sends.
POLICY: dict[str, Any] = {"models": ["bench"], "max_concurrent": 100_000, "requests_per_minute": 10**9,
                          "tokens_per_minute": 10**12, "tokens_per_day": 10**15}

CHAT_MODEL = "chat"
PROMPT = "Tell me about the history of the city of Paris."
KEYS = {"flood": "bench-flood-0123456789abcdef", "single": "bench-single-0123456789abcdef"}


# ---------------------------------------------------------------------------------------------------------- policies


@dataclass
class Point:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_per_1k: float | None
    errors: int


def _post(url: str) -> tuple[int, dict[str, str]]:
    """The small chat request once; its status and headers (lower-case names)."""
    req = urllib.request.Request(url, data=CHAT_REQUEST.encode(), method="POST", headers=AUTH_HEADERS)
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()
        return int(r.status), {k.lower(): v for k, v in r.headers.items()}


def _start_pair(kids: Children, tmp: Path, model: dict[str, Any]) -> tuple[dict[str, str], dict[str, int]]:
    """The two proxies, without and with the policy: their URLs and process roots."""
    urls: dict[str, str] = {}
    roots: dict[str, int] = {}
    for name in CONFIGS:
        d = tmp / name
        d.mkdir(parents=True)
        sections = {"clients.bench": POLICY} if name == "with" else None
        config, port = appliance_config(d, [model], sections=sections)
        roots[name] = start_appliance_proxy(kids, d, config, port).pid
        urls[name] = f"http://{LOOPBACK}:{port}{CHAT_PATH}"
    return urls, roots


def policies(args: argparse.Namespace, tmp: Path) -> None:
    with Children() as kids:
        say("policies: starting the nginx stub")
        stub_port, _ = start_stub_nginx(kids, tmp / "stub")
        model = stub_model(stub_port)
        script = wrk_script(tmp, CHAT_REQUEST, AUTH_HEADERS)
        print("1. policies on the request path: the nginx stub behind two appliance proxies (2 workers each)")
        print("   without: API keys, no [clients] section")
        print("   with:    [clients.bench] " + ", ".join(f"{k} = {v}" for k, v in POLICY.items()))
        print(f"   stub model parallel {STUB_PARALLEL} (the admission queue never holds a request); wrk -t1, "
              f"{args.seconds} s per run, {args.warmup} s warm-up; {args.rounds} rounds, each with two new proxies, "
              f"the best of {args.tries} runs each, alternating the order")
        print()
        points: dict[tuple[str, int], list[Point]] = {}
        counted = 0
        for r in range(args.rounds):
            # New processes every round: one proxy process runs a few per cent faster or slower than an identical
            # one for its whole life (where its memory lies, how the kernel spreads its connections), which rounds
            # with the same two processes would never average out.
            with Children() as proxies:
                say(f"round {r + 1}/{args.rounds}: starting two appliance proxies (without and with the policy)")
                urls, roots = _start_pair(proxies, tmp / f"round{r + 1}", model)
                if r == 0:
                    _check_pair(proxies, urls, f"http://{LOOPBACK}:{stub_port}{CHAT_PATH}")
                idle = {name: idle_cpu_per_s(root) for name, root in roots.items()}
                for c in args.concurrency:
                    tries: dict[str, list[Point]] = {name: [] for name in CONFIGS}
                    for t in range(args.tries):
                        for name in CONFIGS if (r + t) % 2 == 0 else CONFIGS[::-1]:
                            w, per_1k = measured_wrk(urls[name], script, c, args.seconds, args.warmup if t == 0 else 0,
                                                     roots[name], idle[name])
                            tries[name].append(Point(w.rps, w.p50_ms, w.p99_ms, per_1k, w.errors))
                            proxies.check_alive()
                    for name, runs in tries.items():
                        # A run's connections are spread over the proxy's two workers when they connect, and an
                        # uneven spread (12/4) only ever costs throughput: the best run is the proxy's own speed.
                        p = max(runs, key=lambda p: p.rps)
                        p.errors = sum(q.errors for q in runs)
                        points.setdefault((name, c), []).append(p)
                        say(f"c={c} round {r + 1}/{args.rounds} {name}: {p.rps:,.0f} req/s (best of "
                            + " ".join(f"{q.rps:,.0f}" for q in runs) + f"), p50 {p.p50_ms:.3f} ms, "
                            f"p99 {p.p99_ms:.3f} ms, {fmt(p.cpu_per_1k, '.3f')} CPU s/1k req"
                            + (f", {p.errors} errors" if p.errors else ""))
                _, headers = _post(urls["with"])
                counted = POLICY["requests_per_minute"] - int(headers.get("x-ratelimit-remaining-requests", "0"))
        _report_policies(points, args.concurrency)
        print(f"the policy's request window counted {counted:,} requests in the last 60 s at the end of the last "
              "round (every request went through the checks)")
        print()


def _check_pair(kids: Children, urls: dict[str, str], stub_url: str) -> None:
    check_same_answer(kids, urls, stub_url)
    _, headers = _post(urls["with"])
    if headers.get("x-ratelimit-limit-requests") != str(POLICY["requests_per_minute"]):
        raise RuntimeError(f"the proxy with the policy answered without its rate-limit headers: {headers}")
    _, headers = _post(urls["without"])
    if "x-ratelimit-limit-requests" in headers:
        raise RuntimeError("the proxy without a policy answered with rate-limit headers")


def _report_policies(points: dict[tuple[str, int], list[Point]], levels: list[int]) -> None:
    rows = []
    for c in levels:
        for name in CONFIGS:
            ps = points[(name, c)]
            cpus = [p.cpu_per_1k for p in ps if p.cpu_per_1k is not None]
            rows.append([name, str(c), fmt(median(p.rps for p in ps), ",.0f"), fmt(median(p.p50_ms for p in ps), ".3f"),
                         fmt(median(p.p99_ms for p in ps), ".3f"), fmt(median(cpus) if cpus else None, ".3f"),
                         str(sum(p.errors for p in ps))])
    print("medians over the rounds:")
    print(table(["policies", "c", "req/s", "p50 ms", "p99 ms", "proxy CPU s/1k req", "errors"], rows))
    print()
    rows = []
    paired: dict[int, float] = {}
    for c in levels:
        pairs = list(zip(points[("with", c)], points[("without", c)], strict=True))
        rps = [b.rps / a.rps for b, a in pairs]
        paired[c] = median(rps)
        cpu = [b.cpu_per_1k / a.cpu_per_1k for b, a in pairs if b.cpu_per_1k and a.cpu_per_1k]
        rows.append([str(c), fmt(paired[c], ".3f"), f"{min(rps):.3f}-{max(rps):.3f}",
                     fmt(median(b.p50_ms - a.p50_ms for b, a in pairs), "+.3f"),
                     fmt(median(b.p99_ms / a.p99_ms for b, a in pairs), ".3f"),
                     fmt(median(cpu) if cpu else None, ".3f")])
    print("with / without, paired by round (the median of the rounds' ratios):")
    print(table(["c", "req/s with/without", "rounds' range", "p50 with-without ms", "p99 with/without",
                 "CPU/req with/without"], rows))
    print()
    if 16 in paired:
        verdict = "met" if paired[16] >= GOAL_THROUGHPUT else "NOT met"
        print(f"goal: c=16 throughput with policies >= {GOAL_THROUGHPUT} x without: {paired[16]:.3f} x -> {verdict}")
    else:
        print("goal: c=16 throughput: not measured (add 16 to --concurrency)")
    if any(p.errors for ps in points.values() for p in ps):
        print("WARNING: some requests failed (errors column): the figures of those rows are not comparable")


# ---------------------------------------------------------------------------------------------------------- neighbour


@dataclass
class Phase:
    latencies_s: list[float]
    #: The single client's waits for its first token.
    first_token_s: list[float]
    #: The flood's requests, first token to last: a generation as the model runs it next to the others (without the
    #: wait for a slot).
    flood_generations_s: list[float]
    window_s: float
    flood_tokens: int  # token events of the flood received in the window
    single_tokens: int
    flood_errors: int

    @property
    def flood_tps(self) -> float:
        return self.flood_tokens / self.window_s if self.window_s > 0 else float("nan")

    @property
    def total_tps(self) -> float:
        return (self.flood_tokens + self.single_tokens) / self.window_s if self.window_s > 0 else float("nan")


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               stamps: list[float]) -> tuple[float, float]:
    """One streamed chat completion; the time to its last byte and to its first token. Each content event's arrival
    goes to ``stamps``."""
    t0 = time.perf_counter()
    first = 0.0
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
        async for line in resp.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
                    first = first or stamps[-1] - t0
    return time.perf_counter() - t0, first


async def _phase(flood_url: str | None, single_url: str, body: bytes, args: argparse.Namespace,
                 window_s: float = 0.0) -> Phase:
    """The flood (when ``flood_url``) keeps ``args.flood`` requests in flight while the single client sends its
    ``args.singles`` requests, and goes on until ``window_s`` after the single client's first request (when the single
    client took less); the flood's requests still in flight at the end are cancelled."""
    timeout = aiohttp.ClientTimeout(total=args.phase_limit + 60)
    flood_stamps: list[float] = []
    single_stamps: list[float] = []
    errors: list[str] = []
    flood_generations: list[float] = []
    stop = asyncio.Event()
    flood_headers = {**AUTH_HEADERS, "Authorization": f"Bearer {KEYS['flood']}"}
    single_headers = {**AUTH_HEADERS, "Authorization": f"Bearer {KEYS['single']}"}

    async def flooder(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                latency, first_token = await _one(session, flood_url or "", body, flood_headers, flood_stamps)
                flood_generations.append(latency - first_token)
            except (aiohttp.ClientError, RuntimeError) as e:
                if not errors:
                    say(f"  a flood request failed: {e!r}")
                errors.append(str(e))
                await asyncio.sleep(0.5)

    # A new connection per request, both ways: llama-server's HTTP layer closes a kept-alive connection after a few
    # requests, which a pooled client learns only when it sends the next one.
    def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout)

    async with session() as flood_session, session() as single_session:
        tasks = [asyncio.create_task(flooder(flood_session)) for _ in range(args.flood if flood_url else 0)]
        try:
            if tasks:
                await asyncio.sleep(args.settle)  # the flood fills llama-server's queue, or the proxy's
            latencies: list[float] = []
            first_tokens: list[float] = []
            t0 = time.perf_counter()
            for i in range(args.singles):
                if i:
                    await asyncio.sleep(args.interval)
                if time.perf_counter() - t0 > args.phase_limit:
                    say(f"  the phase ran past --phase-limit {args.phase_limit:g} s: {i} single request(s) only")
                    break
                latency, first_token = await _one(single_session, single_url, body, single_headers, single_stamps)
                latencies.append(latency)
                first_tokens.append(first_token)
                say(f"  single request {i + 1}/{args.singles}: {latency:.2f} s, first token after {first_token:.2f} s")
            if tasks:
                await asyncio.sleep(max(0.0, t0 + window_s - time.perf_counter()))
            t1 = time.perf_counter()
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    flood_tokens = sum(1 for s in flood_stamps if t0 <= s <= t1)
    single_tokens = sum(1 for s in single_stamps if t0 <= s <= t1)
    return Phase(latencies, first_tokens, flood_generations, t1 - t0, flood_tokens, single_tokens, len(errors))


async def _drain(url: str) -> None:
    """Until the model has finished or dropped the cancelled requests: a one-token request waits behind them."""
    body = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, \
            session.post(url, data=body, headers=AUTH_HEADERS) as resp:
        await resp.read()


def neighbour(args: argparse.Namespace, tmp: Path) -> None:
    if not BINARY.is_file() or not (MODELS / MODEL_FILE).is_file():
        raise SystemExit(f"{BINARY} or {MODELS / MODEL_FILE} is missing: run scripts/setup.sh first")
    link_model(tmp / "models")
    model_port = free_port()
    model = {"name": CHAT_MODEL, "file": MODEL_FILE, "kind": "chat", "port": model_port,
             "ctx_size": 1024 * args.parallel, "threads": args.threads, "parallel": args.parallel, "max_queue": 64}
    config, proxy_port = appliance_config(tmp, [model], binary=BINARY, models_dir=tmp / "models")
    keys_file = Path(tomllib.loads(config.read_text())["server"]["api_keys_file"])
    keys_file.write_text("".join(f"{name}: {key}\n" for name, key in KEYS.items()))
    body = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    direct = f"http://{LOOPBACK}:{model_port}{CHAT_PATH}"
    proxied = f"http://{LOOPBACK}:{proxy_port}{CHAT_PATH}"
    try:
        with Children() as kids:
            say("neighbour: starting the appliance (appliance up) and waiting for the model")
            start_appliance_up(kids, config, tmp / "up.log", port=proxy_port)
            print(f"2. noisy neighbour: Gemma 3 270M, llama-server --parallel {args.parallel} --threads "
                  f"{args.threads}, max_queue 64; streamed chat completions of {args.max_tokens} tokens "
                  "(temperature 0, ignore_eos)")
            print(f"   flood: {args.flood} requests in flight at all times; single: {args.singles} requests, each "
                  f"{args.interval:g} s after the previous one ended; latency = request sent to last byte")
            print()
            say("warm-up (the prompt enters llama-server's cache)")
            for url in (direct, proxied):
                uvloop.run(_phase(None, url, body, _with(args, singles=1)))
            say("baseline: the single client alone, direct and through the appliance, interleaved")
            base: dict[str, list[float]] = {"direct": [], "appliance": []}
            for _ in range(args.singles):
                for name, url in (("direct", direct), ("appliance", proxied)):
                    base[name] += uvloop.run(_phase(None, url, body, _with(args, singles=1))).latencies_s
            kids.check_alive()
            phases: dict[str, Phase] = {}
            window = args.window
            for name, url in (("direct", direct), ("appliance", proxied)):
                say(f"flood and single client {name}")
                p = phases[name] = uvloop.run(_phase(url, url, body, args, window))
                # The same window both ways: the direct phase's, should its single requests have taken longer.
                window = max(window, p.window_s)
                say(f"  {p.window_s:.1f} s: flood {p.flood_tps:.1f} tokens/s, all {p.total_tps:.1f} tokens/s; "
                    "draining the model")
                uvloop.run(_drain(direct))
                kids.check_alive()
            _report_neighbour(base, phases)
            say("stopping the appliance")
    finally:
        (tmp / "models" / MODEL_FILE).unlink(missing_ok=True)


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """``args`` with some options changed."""
    return argparse.Namespace(**{**vars(args), **changes})


def _report_neighbour(base: dict[str, list[float]], phases: dict[str, Phase]) -> None:
    baseline = median(base["direct"])
    rows = [[f"no flood, {name}", str(len(lat)), fmt(median(lat), ".2f"), fmt(min(lat), ".2f"), fmt(max(lat), ".2f"),
             fmt(median(lat) / baseline, ".2f"), "-", "-", "-", "-"] for name, lat in base.items()]
    for name, p in phases.items():
        lat = p.latencies_s
        rows.append([f"flood, {name}", str(len(lat)), fmt(median(lat), ".2f"), fmt(min(lat), ".2f"),
                     fmt(max(lat), ".2f"), fmt(median(lat) / baseline, ".2f"), fmt(p.window_s, ".1f"),
                     fmt(p.flood_tps, ".1f"),
                     fmt(p.total_tps, ".1f"), str(p.flood_errors)])
    print("the single client's latency (s); the tokens/s the model gave the flood, and everyone, over the same window "
          "from the single client's first request:")
    print(table(["single client", "requests", "p50", "min", "max", "p50 / baseline", "window s", "flood tokens/s",
                 "all tokens/s", "flood errors"], rows))
    print()
    d, a = phases["direct"], phases["appliance"]
    print(f"baseline (no flood, direct) p50 {baseline:.2f} s; through the appliance {median(base['appliance']):.2f} s")
    print(f"single client next to the flood: direct {median(d.latencies_s):.2f} s = "
          f"{median(d.latencies_s) / baseline:.1f} x baseline; through the appliance {median(a.latencies_s):.2f} s = "
          f"{median(a.latencies_s) / baseline:.1f} x baseline; direct / appliance = "
          f"{median(d.latencies_s) / median(a.latencies_s):.1f} x")
    print(f"flood tokens/s appliance / direct: {a.flood_tps / d.flood_tps:.3f} "
          f"(all tokens/s: {a.total_tps / d.total_tps:.3f})")
    # One generation: a flood request through the appliance, as the model runs it next to the others (the goal's
    # unit); the single request alone is shorter (the model then runs one sequence), and shown too.
    generation = median(a.flood_generations_s)
    alone = median(base["appliance"])
    waits = {name: median(p.first_token_s) for name, p in phases.items()}
    print(f"one generation next to the flood: {generation:.2f} s (a flood request's first token to its last, the "
          f"median of {len(a.flood_generations_s)}); the request alone: {alone:.2f} s")
    print(f"the single client's median wait for its first token next to the flood: fair sharing off (llama-server's "
          f"own queue) {waits['direct']:.2f} s = {waits['direct'] / generation:.2f} generations; on (through the "
          f"appliance) {waits['appliance']:.2f} s = {waits['appliance'] / generation:.2f} generations "
          f"({waits['appliance'] / alone:.2f} x the request alone)")
    print(f"goal: <= {GOAL_WAIT} generations with fair sharing: "
          f"{'met' if waits['appliance'] / generation <= GOAL_WAIT else 'NOT met'}")
    print()


# ---------------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--only", choices=("policies", "neighbour"), help="run one of the two measurements")
    g = parser.add_argument_group("1. policies")
    g.add_argument("--seconds", type=int, default=4, help="wrk duration of each measured run (default 4)")
    g.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load before each run (default 1)")
    g.add_argument("--rounds", type=int, default=5, help="rounds per concurrency, alternating the order (default 5)")
    g.add_argument("--tries", type=int, default=3,
                   help="wrk runs per proxy, concurrency and round, alternating; the best counts (default 3)")
    g.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="wrk connections (default 1 16)")
    g = parser.add_argument_group("2. noisy neighbour")
    g.add_argument("--flood", type=int, default=16, help="the flood's requests in flight (default 16)")
    g.add_argument("--singles", type=int, default=5, help="the single client's requests per phase (default 5)")
    g.add_argument("--interval", type=float, default=2.0,
                   help="seconds between the end of a single request and the next (default 2)")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    g.add_argument("--parallel", type=int, default=2, help="the model's slots (llama-server --parallel, default 2)")
    g.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="llama-server --threads (default: all cores but one)")
    g.add_argument("--settle", type=float, default=2.0,
                   help="seconds of flood before the single client's first request (default 2)")
    g.add_argument("--window", type=float, default=40.0,
                   help="seconds over which the flood's tokens/s is counted, from the single client's first request "
                   "(default 40; longer when the direct phase's single requests take longer; then the same both "
                   "ways)")
    g.add_argument("--phase-limit", type=float, default=90.0,
                   help="no single request starts this many seconds into a phase (default 90)")
    args = parser.parse_args()
    tmp = temp_dir("clients")
    say(f"work directory {tmp}")
    print(machine_summary())
    print()
    if args.only != "neighbour":
        (tmp / "policies").mkdir()
        policies(args, tmp / "policies")
    if args.only != "policies":
        (tmp / "neighbour").mkdir()
        neighbour(args, tmp / "neighbour")
    print(machine_summary(load_only=True))
    say(f"stopped everything; logs were in {tmp}")
    return 0


if __name__ == "__main__":
    run_main(main)
