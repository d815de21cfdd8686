"""Conversation affinity: time to first token of multi-turn conversations behind HAProxy, with and without affinity.

Usage: python -m bench.affinity [--conversations 8] [--turns 5] [--context-tokens 1500] [--repetitions 3]
                                [--max-tokens 16] [--think-s 0] [--threads 1] [--parallel 2]

Two "hosts" on loopback: two whole appliances (`python -m appliance up`, each its own config, port and runtime dir),
each serving the installed llama-server and Gemma 3 270M as one chat model ("chat", `parallel` slots, llama-server's
caching left at its defaults). In front of them HAProxy, configured by the role appliance_lb itself: the playbook
ansible/lb-config.yml renders the config from an inventory of the two hosts, twice:

  affinity   the role's defaults: a request carrying a conversation key (prompt_cache_key, else user, else
             X-Session-Id) goes to the host its key hashes to (consistent hashing, bounded by hash-balance-factor)
  leastconn  -e appliance_lb_affinity=false: every request to the host with the fewest connections

Both load balancers run side by side in front of the same two hosts; each repetition runs one arm after the other,
in alternating order (affinity first in odd repetitions, leastconn first in even ones), so that the machine's drift
hits both alike. An arm: --conversations conversations at once (more than the fleet's 2 x --parallel slots), each
with its own context of about --context-tokens tokens (numbered notes, generated from a seed unique to the
conversation, the arm and the repetition: no two conversations share a cached prefix), --turns turns each, every turn
a short question and a streamed answer of --max-tokens tokens (temperature 0), sent with the openai SDK with the
conversation's prompt_cache_key and the SDK's default retries (a request that waited HAProxy's timeout queue for a
free slot gets 503 and is sent again after Retry-After; its TTFT counts from the first attempt, and the retries are
counted). The answer goes back into the history, as a chat client does. Each turn follows the
answer before it at once, or after a pause of up to --think-s seconds (the same pauses in both arms).

Per turn: TTFT (request sent -> first content token received), the host that served it (the load balancer's
X-Appliance-Host response header, appliance_lb_served_by_header), and llama-server's own timings from the stream's
last event (prompt tokens evaluated, tokens taken from its cache, prompt evaluation time). Reported per arm over all
repetitions: the median and p90 TTFT of turn 1 and of turns 2..N, the ratio leastconn / affinity of the turns 2..N
medians (goal: >= 3), the fraction of turns 2..N served by the host of the turn before, how many of them evaluated
most of the context again (a prompt cache miss on that host) and how long those and the others took, the medians per
turn, and which host served each turn of each conversation. Every turn is also written to turns.json in the run's
temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import uvloop
from openai.types.chat import ChatCompletionMessageParam

from bench.common import (
    API_KEY,
    AUTH_HEADERS,
    BINARY,
    LOOPBACK,
    MODEL_FILE,
    MODELS,
    PYTHON,
    REPO,
    Children,
    appliance_config,
    base_parser,
    fmt,
    free_port,
    machine_summary,
    median,
    percentile,
    run_main,
    say,
    start_appliance_up,
    table,
    temp_dir,
    wait_ok,
)

MODEL = "chat"
HOSTS = ("host-a", "host-b")
LB_HOST = "lb"
ARMS = ("affinity", "leastconn")
SERVED_BY = "X-Appliance-Host"
# Names each request's conversation and turn, so that the SDK's retries are counted per turn.
TURN_HEADER = "X-Bench-Turn"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
ANSIBLE_PLAYBOOK = Path(PYTHON).parent / "ansible-playbook"
PLAYBOOK = REPO / "ansible" / "lb-config.yml"
# The GGUF file carries no chat template; the appliance's example config uses llama.cpp's built-in Gemma one.
CHAT_TEMPLATE = "gemma"
WORDS = ("river", "mountain", "ledger", "copper", "violet", "harbor", "engine", "signal", "garden", "winter",
         "market", "lantern", "bridge", "orchard", "canyon", "meadow", "silver", "thunder", "falcon", "pepper",
         "marble", "anchor", "velvet", "compass", "quartz", "willow", "ember", "glacier", "tunnel", "beacon",
         "saddle", "kettle", "island", "forest", "cobalt", "meteor", "prairie", "ribbon", "shadow", "timber")


# ---------------------------------------------------------------------------------------------------------- content


def notes(seed: str, count: int) -> str:
    """``count`` numbered notes from a seeded generator: a different text for every seed."""
    r = random.Random(seed)
    return " ".join(f"Note {i}: the {r.choice(WORDS)} near the {r.choice(WORDS)} holds {r.randint(1, 999)} "
                    f"{r.choice(WORDS)}s." for i in range(count))


def first_message(key: str, count: int) -> str:
    # The conversation's key first: conversations differ from their first tokens on, so none reuses another's cache.
    return (f"Notebook {key}. Read these notes, then answer each question in a few words.\n\n{notes(key, count)}\n\n"
            f"Question 1: which note mentions a harbor?")


def question(key: str, turn: int) -> str:
    return f"Question {turn}: which note mentions a {random.Random(f'{key}/{turn}').choice(WORDS)}?"


def tokens(port: int, text: str) -> int:
    """llama-server's own count (its /tokenize, on its loopback port: a set-up step, not a measurement)."""
    req = urllib.request.Request(f"http://{LOOPBACK}:{port}/tokenize", data=json.dumps({"content": text}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return len(json.load(r)["tokens"])


def notes_for(port: int, context_tokens: int) -> tuple[int, int]:
    """How many notes make a first message of about ``context_tokens`` tokens; and its measured token count."""
    probe = first_message("calibration", 100)
    per_note = (tokens(port, probe) - tokens(port, first_message("calibration", 0))) / 100
    count = max(1, round((context_tokens - tokens(port, first_message("calibration", 0))) / per_note))
    return count, tokens(port, first_message("calibration", count))


# ---------------------------------------------------------------------------------------------------------- set-up


def host_model(port: int, ctx_size: int, threads: int, parallel: int, max_queue: int) -> dict[str, Any]:
    return {"name": MODEL, "file": MODEL_FILE, "kind": "chat", "chat_template": CHAT_TEMPLATE, "port": port,
            "ctx_size": ctx_size, "threads": threads, "parallel": parallel, "max_queue": max_queue}


@dataclass
class Host:
    name: str
    config: Path
    port: int
    model: dict[str, Any]


def write_host(tmp: Path, name: str, model: dict[str, Any]) -> Host:
    """One appliance's directory: its config (API keys on, loopback), runtime dir and a link to the model file."""
    root = tmp / name
    (root / "models").mkdir(parents=True)
    os.link((MODELS / MODEL_FILE).resolve(), root / "models" / MODEL_FILE)
    config, port = appliance_config(root, [model], binary=BINARY, models_dir=root / "models")
    return Host(name, config, port, model)


def inventory(hosts: Sequence[Host], lb_port: int) -> dict[str, Any]:
    """The two appliances as the group gpu_hosts and one load balancer, all run here (ansible_connection local, with
    this Python: interpreter discovery could pick another one without Ansible's modules' needs)."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": PYTHON}
    return {"all": {"children": {
        "gpu_hosts": {"hosts": {h.name: {
            **local,
            "appliance_server_bind": [LOOPBACK],
            "appliance_server_port": h.port,
            "appliance_models": [dict(h.model)],
        } for h in hosts}},
        "appliance_lb": {"hosts": {LB_HOST: {
            **local,
            "appliance_lb_bind": [LOOPBACK],
            "appliance_lb_port": lb_port,
            # Its own exporter port: the role's default (8405) would be shared by both arms' HAProxy (SO_REUSEPORT).
            "appliance_lb_exporter_port": free_port(),
        }}},
    }}}


def render_lb(tmp: Path, hosts: Sequence[Host], arm: str, lb_port: int) -> Path:
    """HAProxy's config for one arm, rendered by ansible/lb-config.yml (the role's template); its path."""
    root = tmp / f"lb-{arm}"
    root.mkdir()
    inv = root / "inventory.json"
    inv.write_text(json.dumps(inventory(hosts, lb_port), indent=2))
    extra = root / "vars.json"
    extra.write_text(json.dumps({"appliance_lb_served_by_header": SERVED_BY,
                                 "appliance_lb_affinity": arm == "affinity"}))
    out = root / "rendered"
    argv = [str(ANSIBLE_PLAYBOOK), "-i", str(inv), str(PLAYBOOK), "-e", f"appliance_lb_config_dir={out}",
            "-e", f"@{extra}"]
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run(argv, cwd=REPO / "ansible", env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    (root / "ansible.log").write_text(done.stdout + done.stderr)
    cfg = out / LB_HOST / "haproxy.cfg"
    if done.returncode != 0 or not cfg.is_file():
        raise RuntimeError(f"{PLAYBOOK.name} failed ({done.returncode}) for the {arm} arm; "
                           f"{' '.join(argv)}:\n{(done.stdout + done.stderr)[-4000:]}")
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c refused the {arm} config {cfg}:\n{check.stdout}{check.stderr}")
    return cfg


def routing(cfg: Path) -> str:
    """How the rendered config balances the chat model's requests (printed with the results): its backends'
    balance, hash and maxconn settings."""
    backends: dict[str, list[str]] = {}
    current = ""
    for line in cfg.read_text().splitlines():
        words = line.split()
        if line.startswith("backend "):
            current = words[1]
            backends[current] = []
        elif current.endswith(f"_{MODEL}") and words and words[0] in ("balance", "hash-type", "hash-balance-factor"):
            backends[current].append(" ".join(words))
        elif current.endswith(f"_{MODEL}") and words[:1] == ["server"] and "maxconn" in words:
            backends[current].append(f"{words[1]} maxconn {words[words.index('maxconn') + 1]}")
    return "; ".join(f"backend {name}: {', '.join(v)}" for name, v in backends.items() if name.endswith(f"_{MODEL}"))


def start_host(kids: Children, host: Host) -> None:
    start_appliance_up(kids, host.config, host.config.parent / "up.log", f"appliance {host.name}")


def short_chat(url: str) -> None:
    """One small answer (a warm-up: a fresh llama-server's first request allocates its buffers)."""
    body = json.dumps({"model": MODEL, "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": "Hello"}]}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=AUTH_HEADERS)
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


# ---------------------------------------------------------------------------------------------------------- one arm


@dataclass
class Turn:
    arm: str
    rep: int
    conv: int
    turn: int  # 1-based
    ttft_s: float
    host: str
    prompt_n: int | None  # prompt tokens llama-server evaluated
    cache_n: int | None  # prompt tokens it took from its cache
    prompt_ms: float | None
    retried: int = 0  # answers the SDK retried (HAProxy's 503 when no host took the request within timeout queue)


async def conversation(client: openai.AsyncOpenAI, arm: str, rep: int, conv: int, run_id: str, note_count: int,
                       turns: int, max_tokens: int, think_s: float) -> list[Turn]:
    key = f"{run_id}-r{rep}-{arm}-c{conv}"
    pauses = random.Random(f"{rep}/{conv}")  # the same pauses in both arms
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": first_message(key, note_count)}]
    done: list[Turn] = []
    for t in range(1, turns + 1):
        if t > 1 and think_s > 0:
            await asyncio.sleep(pauses.uniform(0, think_s))  # the user reads the answer and types the next question
        t0 = time.perf_counter()
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True, prompt_cache_key=key,
            extra_headers={TURN_HEADER: f"{conv}/{t}"})
        host = raw.headers.get(SERVED_BY, "?")
        stream = raw.parse()
        first: float | None = None
        any_chunk: float | None = None
        text: list[str] = []
        timings: dict[str, Any] = {}
        async for chunk in stream:
            now = time.perf_counter() - t0
            any_chunk = now if any_chunk is None else any_chunk
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content:
                first = now if first is None else first
                text.append(content)
            extra = chunk.model_extra or {}
            if isinstance(extra.get("timings"), dict):
                timings = extra["timings"]
        if any_chunk is None:
            raise RuntimeError(f"{arm} conversation {conv} turn {t}: the stream ended without an event")
        done.append(Turn(arm, rep, conv, t, first if first is not None else any_chunk, host,
                         _int(timings.get("prompt_n")), _int(timings.get("cache_n")), _float(timings.get("prompt_ms"))))
        messages.append({"role": "assistant", "content": "".join(text)})
        messages.append({"role": "user", "content": question(key, t + 1)})
    return done


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) else None


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


async def run_arm(lb_url: str, arm: str, rep: int, run_id: str, args: Any, note_count: int) -> list[Turn]:
    """Every conversation of one arm at once; bounded by --request-timeout per request and --arm-timeout in all."""
    retried: dict[str, int] = {}

    async def count_retried(response: httpx.Response) -> None:
        if response.status_code >= 400:
            turn = response.request.headers.get(TURN_HEADER, "?")
            retried[turn] = retried.get(turn, 0) + 1

    # The SDK's own retries (2, after Retry-After), as any client of the fleet has them: a request that waited
    # timeout queue in HAProxy gets 503 and is sent again; its TTFT counts from the first attempt.
    client = openai.AsyncOpenAI(base_url=lb_url + "/v1", api_key=API_KEY, timeout=args.request_timeout,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    event_hooks={"response": [count_retried]}))
    tasks = [asyncio.create_task(conversation(client, arm, rep, c, run_id, note_count, args.turns, args.max_tokens,
                                              args.think_s)) for c in range(args.conversations)]
    try:
        done, pending = await asyncio.wait(tasks, timeout=args.arm_timeout, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        failed = [e for t in done if (e := t.exception()) is not None]
        if failed:
            raise failed[0]
        if pending:
            raise TimeoutError(f"{arm}: {len(pending)} conversations unfinished after {args.arm_timeout:g} s")
        results = [t.result() for t in tasks]
    finally:
        await client.close()
    turns = [t for conv in results for t in conv]
    for t in turns:
        t.retried = retried.get(f"{t.conv}/{t.turn}", 0)
    return turns


# ---------------------------------------------------------------------------------------------------------- report


def stats(values: Sequence[float]) -> tuple[float, float]:
    s = sorted(values)
    return (median(s), percentile(s, 90)) if s else (float("nan"), float("nan"))


def returned(turns: Sequence[Turn]) -> tuple[int, int]:
    """Turns 2..N served by the host of the conversation's turn before; and how many turns 2..N there were."""
    by_conv: dict[tuple[int, int], dict[int, str]] = {}
    for t in turns:
        by_conv.setdefault((t.rep, t.conv), {})[t.turn] = t.host
    same = total = 0
    for hosts in by_conv.values():
        for n, host in hosts.items():
            if n > 1 and n - 1 in hosts:
                total += 1
                same += host == hosts[n - 1]
    return same, total


def report(turns: Sequence[Turn], args: Any, context_tokens: int) -> None:
    later = {arm: [t for t in turns if t.arm == arm and t.turn > 1] for arm in ARMS}
    first = {arm: [t for t in turns if t.arm == arm and t.turn == 1] for arm in ARMS}
    miss_at = context_tokens / 2
    rows, why = [], []
    for arm in ARMS:
        m1, p1 = stats([t.ttft_s for t in first[arm]])
        m, p = stats([t.ttft_s for t in later[arm]])
        same, total = returned([t for t in turns if t.arm == arm])
        rows.append([arm, fmt(m1, ".3f"), fmt(p1, ".3f"), fmt(m, ".3f"), fmt(p, ".3f"),
                     fmt(sum(t.ttft_s for t in later[arm]) / max(1, len(later[arm])), ".3f"),
                     f"{same}/{total} ({100 * same / max(1, total):.0f}%)",
                     str(sum(t.retried for t in turns if t.arm == arm))])
        known = [t for t in later[arm] if t.prompt_n is not None]
        for label, group in (("reused", [t for t in known if (t.prompt_n or 0) <= miss_at]),
                             ("re-evaluated", [t for t in known if (t.prompt_n or 0) > miss_at])):
            waits = [t.ttft_s - t.prompt_ms / 1000 for t in group if t.prompt_ms is not None]
            why.append([f"{arm}, context {label}", f"{len(group)}/{len(known)}",
                        fmt(median(t.ttft_s for t in group) if group else None, ".3f"),
                        fmt(median(t.prompt_n or 0 for t in group) if group else None, ".0f"),
                        fmt(median(t.prompt_ms or 0.0 for t in group) if group else None, ".0f"),
                        fmt(median(waits) if waits else None, ".3f")])
    print(f"TTFT in seconds over {args.repetitions} repetition(s) of {args.conversations} conversations x "
          f"{args.turns} turns per arm; context {context_tokens} tokens; {args.max_tokens} tokens per answer")
    print(table(["arm", "turn 1 p50", "turn 1 p90", f"turns 2-{args.turns} p50", "p90", "mean",
                 "same host as the turn before", "503s retried by the SDK"], rows))
    print()
    print(f"Turns 2-{args.turns} by what llama-server did (its timings): the context taken from its cache, or "
          f"evaluated again (> {miss_at:.0f} prompt tokens)")
    print(table(["arm, context", "turns", "TTFT p50", "prompt tokens p50", "prompt ms p50",
                 "outside prompt eval p50 (s)"], why))
    print()

    per_turn = []
    for n in range(1, args.turns + 1):
        row = [f"turn {n}"]
        for arm in ARMS:
            values = [t.ttft_s for t in turns if t.arm == arm and t.turn == n]
            prompt = [t.prompt_n for t in turns if t.arm == arm and t.turn == n and t.prompt_n is not None]
            row += [fmt(median(values) if values else None, ".3f"), fmt(median(prompt) if prompt else None, ".0f")]
        per_turn.append(row)
    print("Per turn: median TTFT (s) and median prompt tokens evaluated by llama-server")
    print(table(["turn", "affinity TTFT", "affinity evaluated", "leastconn TTFT", "leastconn evaluated"], per_turn))
    print()

    print("Host of each turn per conversation (a = host-a, b = host-b), and the median TTFT of turns 2-N in seconds")
    for rep in range(args.repetitions):
        for arm in ARMS:
            convs: dict[int, list[Turn]] = {}
            for t in turns:
                if t.arm == arm and t.rep == rep:
                    convs.setdefault(t.conv, []).append(t)
            cells = []
            for c in sorted(convs):
                ts = sorted(convs[c], key=lambda x: x.turn)
                cells.append("".join(t.host[-1:] if t.host != "?" else "?" for t in ts))
            later_rep = [t.ttft_s for t in turns if t.arm == arm and t.rep == rep and t.turn > 1]
            print(f"  rep {rep + 1} {arm:<9} {' '.join(cells)}   turns 2-{args.turns} p50 "
                  f"{fmt(median(later_rep) if later_rep else None, '.3f')} s")
    print()

    m_aff = stats([t.ttft_s for t in later["affinity"]])[0]
    m_lc = stats([t.ttft_s for t in later["leastconn"]])[0]
    ratio = m_lc / m_aff if m_aff > 0 else float("nan")
    per_rep = []
    for rep in range(args.repetitions):
        a = [t.ttft_s for t in later["affinity"] if t.rep == rep]
        b = [t.ttft_s for t in later["leastconn"] if t.rep == rep]
        if a and b:
            per_rep.append(median(b) / median(a))
    print(f"median TTFT of turns 2-{args.turns}: leastconn / affinity = {fmt(ratio, '.2f')} x "
          f"(per repetition: {', '.join(fmt(r, '.2f') for r in per_rep)})")
    print(f"goal: >= 3 x lower with affinity: {'met' if ratio >= 3 else 'NOT met'}")


# ---------------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--conversations", type=int, default=8,
                        help="conversations at once per arm (more than the 2 x --parallel slots) [%(default)s]")
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation [%(default)s]")
    parser.add_argument("--context-tokens", type=int, default=1500,
                        help="tokens of each conversation's own context (its first message) [%(default)s]")
    parser.add_argument("--repetitions", type=int, default=3,
                        help="runs of both arms, in alternating order [%(default)s]")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer [%(default)s]")
    parser.add_argument("--think-s", type=float, default=0,
                        help="a pause before each turn after the first, uniform in [0, THINK_S] seconds (the same "
                             "pauses in both arms; 0: each turn right after the answer before it) [%(default)s]")
    parser.add_argument("--threads", type=int, default=1,
                        help="llama-server --threads per host (two hosts share the machine) [%(default)s]")
    parser.add_argument("--parallel", type=int, default=2, help="llama-server slots per host [%(default)s]")
    parser.add_argument("--request-timeout", type=float, default=300, help="seconds per request [%(default)s]")
    parser.add_argument("--arm-timeout", type=float, default=900, help="seconds per arm at most [%(default)s]")
    args = parser.parse_args()
    for name in ("conversations", "turns", "context_tokens", "repetitions", "max_tokens", "threads", "parallel"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    if not 0 <= args.think_s <= 60:
        parser.error("--think-s must be within 0-60")
    if not PLAYBOOK.is_file():
        parser.error(f"{PLAYBOOK} is missing: the load balancer's config is rendered by it")
    uvloop.install()
    tmp = temp_dir("affinity")
    (MODELS / MODEL_FILE).read_bytes()  # the page cache warm for both hosts
    # Each slot holds a whole conversation: the context, and each turn's question and answer, with room to spare.
    per_slot = -(-(int(args.context_tokens * 1.1) + args.turns * (48 + args.max_tokens) + 256) // 512) * 512
    max_queue = max(4 * args.parallel, args.conversations)
    hosts = [write_host(tmp, name, host_model(free_port(), per_slot * args.parallel, args.threads, args.parallel,
                                              max_queue)) for name in HOSTS]
    lb_ports = {arm: free_port() for arm in ARMS}
    run_id = f"{int(time.time())}"
    print(machine_summary())
    with Children() as kids:
        say(f"rendering HAProxy's config with {PLAYBOOK.relative_to(REPO)}, with and without affinity")
        configs = {arm: render_lb(tmp, hosts, arm, lb_ports[arm]) for arm in ARMS}
        for h in hosts:
            say(f"starting appliance {h.name} on port {h.port} (ctx_size {h.model['ctx_size']}, "
                f"parallel {args.parallel}, threads {args.threads})")
            start_host(kids, h)
        for h in hosts:
            wait_ok(kids, f"appliance {h.name}", "GET", f"http://{LOOPBACK}:{h.port}/health", timeout_s=180)
        for arm in ARMS:
            kids.start(f"haproxy ({arm})", [HAPROXY, "-f", str(configs[arm]), "-db"], tmp / f"haproxy-{arm}.log")
            wait_ok(kids, f"haproxy ({arm})", "GET", f"http://{LOOPBACK}:{lb_ports[arm]}/health", timeout_s=30)
        say("warming up each host")
        for h in hosts:
            short_chat(f"http://{LOOPBACK}:{h.port}")
        note_count, context_tokens = notes_for(hosts[0].model["port"], args.context_tokens)
        say(f"each conversation's first message: {note_count} notes, {context_tokens} tokens")
        for arm in ARMS:
            print(f"{arm} (rendered by {PLAYBOOK.relative_to(REPO)}): {routing(configs[arm])}")
        print(f"hosts: 2 appliances, model {MODEL} = {MODEL_FILE}, parallel {args.parallel}, ctx_size "
              f"{per_slot * args.parallel}, threads {args.threads}; llama-server's caching at its defaults")
        print()

        turns: list[Turn] = []
        for rep in range(args.repetitions):
            order = ARMS if rep % 2 == 0 else ARMS[::-1]
            for arm in order:
                say(f"repetition {rep + 1}/{args.repetitions}, {arm}: {args.conversations} conversations x "
                    f"{args.turns} turns")
                t0 = time.monotonic()
                got = asyncio.run(run_arm(f"http://{LOOPBACK}:{lb_ports[arm]}", arm, rep, run_id, args, note_count))
                turns += got
                later = [t.ttft_s for t in got if t.turn > 1]
                same, total = returned(got)
                say(f"  {arm} done in {time.monotonic() - t0:.1f} s: turns 2-{args.turns} TTFT p50 "
                    f"{fmt(median(later) if later else None, '.3f')} s, same host {same}/{total}, "
                    f"{sum(t.retried for t in got)} answers retried")
                kids.check_alive()
        report(turns, args, context_tokens)
        print(machine_summary(load_only=True))
        (tmp / "turns.json").write_text(json.dumps([t.__dict__ for t in turns], indent=1))
    say(f"stopped everything; logs and every turn (turns.json) are in {tmp}")
    return 0


if __name__ == "__main__":
    run_main(main)
