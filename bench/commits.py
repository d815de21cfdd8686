"""Commits: the appliance proxy at another commit against the working tree, round by round.

Usage: python -m bench.commits [--base REF] [--concurrency 1] [--seconds 4] [--rounds 10]

A change worth 0.02-0.03 ms at one connection is smaller than what a small machine drifts between two runs of
bench.proxy_overhead. Here both proxies run at once, in front of the same nginx stub and with the same load as
bench.proxy_overhead's, and take turns: every round measures both, in alternating order, and is compared within
itself, so drift across the run cancels out of each round's difference. The base is ``git archive REF appliance``
unpacked in a temporary directory; everything else (this benchmark, the dependencies) is this checkout's.

Reported: p50, requests/s and the proxy's CPU seconds per 1,000 requests of each (medians over rounds), then each
round's difference (working tree minus base), its median, and in how many rounds the working tree was faster.
"""

from __future__ import annotations

import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

from bench.common import (
    AUTH_HEADERS,
    CHAT_PATH,
    CHAT_REQUEST,
    LOOPBACK,
    REPO,
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
    start_stub_nginx,
    stub_model,
    table,
    temp_dir,
    wrk_script,
)


def export_package(ref: str, into: Path) -> str:
    """Unpack ``ref``'s ``appliance`` package into ``into``; returns the commit's short hash."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--short", f"{ref}^{{commit}}"], cwd=REPO,
                           capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise SystemExit(f"--base {ref}: not a commit of this repository ({found.stderr.strip()})")
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "appliance"], cwd=REPO, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return found.stdout.strip()


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--base", default="HEAD", help="the commit to compare the working tree with (default HEAD)")
    parser.add_argument("--concurrency", type=int, default=1, help="wrk connections (default 1)")
    parser.add_argument("--seconds", type=int, default=4, help="wrk duration of each measured run (default 4)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds, each measuring both proxies (default 10)")
    args = parser.parse_args()
    tmp = temp_dir("commits")
    say(f"work directory {tmp}")
    base_tree = tmp / "base"
    base_tree.mkdir()
    sha = export_package(args.base, base_tree)
    names = {"base": f"base {sha}", "work": "working tree"}
    with Children() as kids:
        say(f"starting the nginx stub and the proxy twice: {args.base} ({sha}) and the working tree")
        stub_port, _ = start_stub_nginx(kids, tmp / "stub")
        urls: dict[str, str] = {}
        roots: dict[str, int] = {}
        for key in names:
            (tmp / key / "run").mkdir(parents=True)
            config, port = appliance_config(tmp / key / "run", [stub_model(stub_port)])
            tree = base_tree if key == "base" else None
            roots[key] = start_appliance_proxy(kids, tmp / key / "run", config, port, tree).pid
            urls[key] = f"http://{LOOPBACK}:{port}{CHAT_PATH}"
        check_same_answer(kids, {names[key]: url for key, url in urls.items()},
                          f"http://{LOOPBACK}:{stub_port}{CHAT_PATH}")
        script = wrk_script(tmp, CHAT_REQUEST, AUTH_HEADERS)
        say("measuring the proxies' CPU time at rest")
        idle = {key: idle_cpu_per_s(root) for key, root in roots.items()}
        print(machine_summary())
        print(f"wrk -t1 -c{args.concurrency}, {args.seconds} s per run after 1 s of warm-up, {args.rounds} rounds, "
              "the two proxies in alternating order")
        print()
        runs: dict[str, list[tuple[float, float, float]]] = {key: [] for key in names}
        for r in range(args.rounds):
            for key in (("base", "work") if r % 2 == 0 else ("work", "base")):
                w, per_1k = measured_wrk(urls[key], script, args.concurrency, args.seconds, 1, roots[key], idle[key])
                if w.errors or per_1k is None:
                    raise RuntimeError(f"{names[key]}: {w.errors} of {w.requests} requests failed")
                runs[key].append((w.p50_ms, w.rps, per_1k))
                say(f"round {r + 1}/{args.rounds} {names[key]}: p50 {w.p50_ms:.3f} ms, {w.rps:,.0f} req/s")
                kids.check_alive()
        print(table(["proxy", "p50 ms", "req/s", "CPU s/1k req"],
                    [[names[key], fmt(median(x[0] for x in got), ".3f"), fmt(median(x[1] for x in got), ",.0f"),
                      fmt(median(x[2] for x in got), ".3f")] for key, got in runs.items()]))
        print()
        rounds = list(zip(runs["base"], runs["work"], strict=True))
        p50_diff = [work[0] - base[0] for base, work in rounds]
        print("p50 working tree - base, per round (ms): " + " ".join(f"{d:+.3f}" for d in p50_diff))
        print(f"median {median(p50_diff):+.3f} ms; the working tree was faster in "
              f"{sum(d < 0 for d in p50_diff)} of {len(rounds)} rounds; "
              f"req/s {median(work[1] / base[1] for base, work in rounds):.3f} x, "
              f"CPU per request {median(work[2] / base[2] for base, work in rounds):.3f} x the base's "
              "(medians of the rounds' ratios)")
        print(machine_summary(load_only=True))
    say(f"stopped everything; logs were in {tmp}")
    return 0


if __name__ == "__main__":
    run_main(main)
