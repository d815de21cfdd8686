"""Soak: mixed traffic from many concurrent clients against a running appliance, then checks that nothing leaked.

    .venv/bin/python -m tests.e2e.soak --config examples/local.toml --minutes 30

The config names everything the soak looks at: the proxy's URL, the supervisord socket (which gives the gunicorn
arbiter, hence its workers) and each model's loopback port. Clients send chat and text completions, streamed and not,
with small ``max_tokens``; a few of them leave streams half-read. Checked: no 5xx and no transport error (429 is
reported, not a failure: it is the host's ``max_queue`` bound), every stream read to the end is complete, the proxy
workers' RSS and open file descriptors stay flat after the warm-up, and every llama-server slot is idle at the end.
Exit status 1 when a check fails; the summary is printed either way.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from appliance.config import ApplianceConfig, ModelConfig, load
from appliance.runtime.supervisor_rpc import all_process_info
from tests.e2e.faults_support import children, open_fds, status_kb
from tests.helpers import samples, value

KINDS = ("completion", "chat", "completion-stream", "chat-stream")
PROMPT = "Write one short sentence about the sea."


@dataclass
class Result:
    kind: str
    status: int | None  # None: a transport error
    seconds: float
    detail: str = ""  # error code, exception, or what was wrong with a stream


@dataclass
class Footprint:
    """VmRSS (kB) and open file descriptors of each proxy worker, by pid."""

    rss_kb: dict[int, int]
    fds: dict[int, int]

    @classmethod
    def take(cls, workers: set[int]) -> Footprint:
        return cls({p: status_kb(p, "VmRSS") for p in workers}, {p: open_fds(p) for p in workers})

    def __str__(self) -> str:
        return ", ".join(f"{p}: {self.rss_kb[p] / 1024:.1f} MB {self.fds[p]} fds" for p in sorted(self.rss_kb))


@dataclass
class Soak:
    cfg: ApplianceConfig
    url: str
    clients: int = 16
    abandoners: int = 2  # clients that leave every other stream after a couple of events
    api_key: str = ""
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def model(self) -> ModelConfig:
        return next(m for m in self.cfg.models if m.kind == "chat")

    def workers(self) -> set[int]:
        socket = Path(self.cfg.supervision.runtime_dir) / "supervisor.sock"
        arbiter = next(int(i["pid"]) for i in all_process_info(socket) if i["name"] == "proxy")
        return children(arbiter)

    def _request(self, c: httpx.Client, kind: str, rng: random.Random) -> Result:
        chat = kind.startswith("chat")
        streamed = kind.endswith("stream") or kind == "abandon"
        body: dict[str, object] = {"model": self.model.name, "max_tokens": rng.randint(2, 12), "stream": streamed}
        if chat:
            body["messages"] = [{"role": "user", "content": PROMPT}]
        else:
            body["prompt"] = PROMPT
        if kind == "abandon":
            body.update(max_tokens=200, ignore_eos=True)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        t0 = time.perf_counter()
        try:
            with c.stream("POST", self.url + path, json=body) as r:
                if r.status_code != 200:
                    code = json.loads(r.read()).get("error", {}).get("code", "")
                    return Result(kind, r.status_code, time.perf_counter() - t0, code)
                if not streamed:
                    ok = bool(json.loads(r.read()).get("choices"))
                    return Result(kind, 200, time.perf_counter() - t0, "" if ok else "no choices")
                events = 0
                last = ""
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events += 1
                        last = line
                        if kind == "abandon" and events == 2:
                            return Result(kind, 200, time.perf_counter() - t0)  # closing the response disconnects
                detail = "" if last == "data: [DONE]" else f"stream ended with {last[:200]!r}"
                return Result(kind, 200, time.perf_counter() - t0, detail)
        except (httpx.HTTPError, ValueError) as e:
            return Result(kind, None, time.perf_counter() - t0, repr(e))

    def _client(self, i: int, until: float) -> None:
        rng = random.Random(i)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(timeout=120, headers=headers) as c:
            n = 0
            while time.monotonic() < until:
                kind = "abandon" if i < self.abandoners and n % 2 == 0 else rng.choice(KINDS)
                result = self._request(c, kind, rng)
                with self.lock:
                    self.results.append(result)
                n += 1

    def _scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        r = httpx.get(f"http://127.0.0.1:{self.cfg.metrics.port}/metrics", timeout=10)
        r.raise_for_status()
        return samples(r.text)

    def busy_slots(self) -> int:
        """Slots of the chat models that are still processing: llama-server's /slots, else its requests_processing."""
        busy = 0
        for m in self.cfg.models:
            base = f"http://127.0.0.1:{m.port}"
            r = httpx.get(base + "/slots", timeout=5)
            if r.status_code == 200:
                busy += sum(1 for s in r.json() if s.get("is_processing"))
            else:
                text = httpx.get(base + "/metrics", timeout=5).text
                busy += int(value(samples(text), "llamacpp:requests_processing"))
        return busy

    def run(self, seconds: float, warmup_s: float, rss_mb: float, fds: int) -> tuple[str, list[str]]:
        """(summary, problems): traffic for ``seconds``, footprint after ``warmup_s`` and at the end."""
        errors_before = self._scrape()
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=self._client, args=(i, until), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        time.sleep(warmup_s)
        workers = self.workers()
        start = Footprint.take(workers)
        for t in threads:
            t.join(until - time.monotonic() + 150)
        problems = [f"client {i} still runs 150 s after the end" for i, t in enumerate(threads) if t.is_alive()]
        time.sleep(1.0)  # the last disconnects reach llama-server
        deadline = time.monotonic() + 10
        while (busy := self.busy_slots()) and time.monotonic() < deadline:
            time.sleep(0.2)
        now = self.workers()
        end = Footprint.take(workers & now)
        errors_after = self._scrape()
        with self.lock:
            results = list(self.results)

        statuses = collections.Counter(str(r.status or "error") for r in results)
        done = sorted(r.seconds for r in results if r.kind != "abandon" and r.status == 200)
        upstream = {k: value(errors_after, "appliance_upstream_errors_total", kind=k)
                    - value(errors_before, "appliance_upstream_errors_total", kind=k)
                    for k in ("refused", "reset", "timeout", "mid-stream")}
        lines = [
            f"soak: {len(results)} requests in {seconds:.0f} s from {self.clients} clients "
            f"({collections.Counter(r.kind for r in results)})",
            f"statuses: {dict(statuses)}; upstream errors: {upstream}",
            f"latency (complete answers): p50 {_pct(done, 50):.3f} s, p99 {_pct(done, 99):.3f} s",
            f"proxy workers after {warmup_s:.0f} s: {start}",
            f"proxy workers at the end: {end}",
            f"busy llama-server slots at the end: {busy}",
        ]
        problems += [f"{r.kind}: {r.status or 'transport error'} {r.detail}" for r in results
                     if r.status not in (200, 429) or (r.status == 200 and r.detail)]
        problems += [f"worker {p} is gone (it was replaced)" for p in workers - now]
        for p in end.rss_kb:
            if end.rss_kb[p] - start.rss_kb[p] > rss_mb * 1024:
                problems.append(f"worker {p}: RSS grew {(end.rss_kb[p] - start.rss_kb[p]) / 1024:.1f} MB")
            if end.fds[p] - start.fds[p] > fds:
                problems.append(f"worker {p}: {end.fds[p] - start.fds[p]} more open fds")
        if busy:
            problems.append(f"{busy} llama-server slots still busy 10 s after the traffic stopped")
        if not done:
            problems.append("no request completed")
        return "\n".join(lines), problems


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the running appliance's config")
    parser.add_argument("--url", help="the proxy (default: http:// on the config's first bind address)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--abandoners", type=int, default=2, help="clients that leave streams half-read")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--warmup-s", type=float, default=20.0, help="footprint is measured from then on")
    parser.add_argument("--rss-mb", type=float, default=30.0, help="allowed RSS growth per worker after the warm-up")
    parser.add_argument("--fds", type=int, default=20, help="allowed fd growth per worker after the warm-up")
    args = parser.parse_args(argv)
    cfg = load(args.config, check_files=False)
    host = cfg.server.bind[0]
    url = args.url or f"http://{f'[{host}]' if ':' in host else host}:{cfg.server.port}"
    soak = Soak(cfg, url.rstrip("/"), args.clients, args.abandoners, args.api_key)
    summary, problems = soak.run(args.minutes * 60, min(args.warmup_s, args.minutes * 15), args.rss_mb, args.fds)
    print(summary)
    for p in problems[:50]:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
