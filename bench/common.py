"""What every benchmark needs: ports, configs, child processes (nginx, the proxies, stubs), wrk, CPU time, tables.

The benchmarks import nothing from tests/: they are run on machines (and by people) that do not run the test suite.
Every process started here is started through ``Children``, which stops it (its whole process group) on exit, also
on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from appliance.runtime.supervisor_conf import GUNICORN_CONF

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
# Debian puts nginx in /usr/sbin, which is not in an ordinary user's PATH.
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# The llama-server binary and the default model that scripts/setup.sh installs (bench.real_model, bench.swap).
BINARY = Path(os.environ.get("APPLIANCE_LLAMA_SERVER", REPO / ".appliance" / "bin" / "llama-server"))
MODELS = Path(os.environ.get("APPLIANCE_MODELS_DIR", REPO / ".appliance" / "models"))
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
API_KEY = "bench-0123456789abcdef"
AUTH_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
# A small chat completion, the size of an OpenAI answer to a short question: the proxy's per-request cost dominates.
CHAT_RESPONSE = ('{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench","choices":[{"index":0,'
                 '"finish_reason":"stop","message":{"role":"assistant","content":"Hello! How can I help you today?"}}],'
                 '"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}')
CHAT_REQUEST = '{"model":"bench","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'
CHAT_PATH = "/v1/chat/completions"


def say(message: str) -> None:
    """A progress line (stderr, so that stdout holds only the results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def run_main(main: Callable[[], int]) -> NoReturn:
    """Run a benchmark's main; Ctrl-C and SIGTERM end it through the ``with Children()`` that stops the children."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        code = main()
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    sys.exit(code)


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def temp_dir(prefix: str) -> Path:
    # Readable by everyone: nginx's workers run as nobody when the benchmark runs as root.
    path = Path(tempfile.mkdtemp(prefix=f"appliance-bench-{prefix}-"))
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------------------- processes


class Children:
    """The processes a benchmark started; each gets its own process group, stopped as a whole on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path, float]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)

    def start(self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
              stop_wait_s: float = 30, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own process group; on exit it gets SIGTERM, then SIGKILL after ``stop_wait_s``."""
        with log.open("wb") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        self.procs.append((name, proc, log, stop_wait_s))
        return proc

    def check_alive(self) -> None:
        for name, proc, log, _ in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{tail(log)}")

    def stop(self, proc: subprocess.Popen[bytes], wait_s: float = 30) -> None:
        if proc.poll() is None:
            # The group: gunicorn's workers and nginx's workers go with their parent even if it dies first.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of an exited leader

    def stop_all(self) -> None:
        while self.procs:
            _, proc, _, wait_s = self.procs.pop()
            self.stop(proc, wait_s)


def tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def http(method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
         timeout: float = 5) -> tuple[int, bytes]:
    """One blocking request (standard library only: used for start-up checks, never for measurements)."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ok(kids: Children, what: str, method: str, url: str, body: bytes | None = None,
            headers: Mapping[str, str] | None = None, timeout_s: float = 60) -> bytes:
    """Until ``url`` answers 200; returns the body. Fails early when a child exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        kids.check_alive()
        try:
            status, data = http(method, url, body, headers)
            if status == 200:
                return data
            last = f"HTTP {status}: {data[:200]!r}"
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer 200 at {url} within {timeout_s:g} s ({last})")


# ---------------------------------------------------------------------------------------------------------- nginx


def nginx_conf(tmp: Path, workers: int, server_block: str) -> Path:
    """A self-contained nginx config: pid, logs and temp files in ``tmp``, no access log, long keep-alive."""
    temp = "\n".join(f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                           "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(f"""worker_processes {workers};
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    # Default 1000: nginx would close wrk's and the proxies' connections every 1000 requests.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{server_block}
}}
""")
    return conf


def start_nginx(kids: Children, tmp: Path, name: str, workers: int, server_block: str) -> subprocess.Popen[bytes]:
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o755)
    conf = nginx_conf(tmp, workers, server_block)
    return kids.start(name, [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"),
                             "-g", "daemon off;"], tmp / "stdout.log")


def start_stub_nginx(kids: Children, tmp: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """The fast upstream: nginx answering every POST with ``CHAT_RESPONSE`` and GET /health with 200 (the appliance
    polls it). One worker: it is not what is measured, and the proxies need the cores more."""
    port = free_port()
    block = f"""    server {{
        listen {LOOPBACK}:{port};
        default_type application/json;
        location = /health {{ return 200 '{{"status":"ok"}}'; }}
        location / {{ return 200 '{CHAT_RESPONSE}'; }}
    }}"""
    proc = start_nginx(kids, tmp, "nginx stub", 1, block)
    wait_ok(kids, "nginx stub", "POST", f"http://{LOOPBACK}:{port}{CHAT_PATH}", CHAT_REQUEST.encode(), AUTH_HEADERS)
    return port, proc


def start_nginx_proxy(kids: Children, tmp: Path, upstream_port: int, workers: int = 2
                      ) -> tuple[int, subprocess.Popen[bytes]]:
    """nginx as the reverse proxy, with pooled upstream connections (as the Python proxies pool theirs)."""
    port = free_port()
    block = f"""    upstream stub {{ server {LOOPBACK}:{upstream_port}; keepalive 256; keepalive_requests 1000000; }}
    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://stub;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    proc = start_nginx(kids, tmp, "nginx proxy", workers, block)
    wait_ok(kids, "nginx proxy", "POST", f"http://{LOOPBACK}:{port}{CHAT_PATH}", CHAT_REQUEST.encode(), AUTH_HEADERS)
    return port, proc


# ---------------------------------------------------------------------------------------------------------- appliance


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return str(v)


def render_toml(doc: Mapping[str, Any]) -> str:
    out: list[str] = []
    for section, values in doc.items():
        if section == "models":
            for m in values:
                out.append("[[models]]")
                out += [f"{k} = {_toml(v)}" for k, v in m.items()]
        else:
            out.append(f"[{section}]")
            out += [f"{k} = {_toml(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def appliance_config(tmp: Path, models: list[dict[str, Any]], binary: Path | None = None,
                     models_dir: Path | None = None, sections: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> tuple[Path, int]:
    """Write an appliance config (API keys on, 2 workers, loopback) and its keys file; returns (path, proxy port).

    ``binary``/``models_dir`` default to paths in ``tmp``: the proxy alone does not check them. ``sections`` are
    merged over the defaults (``{"memory": {"CPU": 1000}}``)."""
    keys = tmp / "api_keys"
    keys.write_text(f"bench: {API_KEY}\n")
    port = free_port()
    bin_path = binary or tmp / "bin" / "llama-server"
    doc: dict[str, Any] = {
        "server": {"bind": [LOOPBACK], "port": port, "workers": 2, "api_keys_file": str(keys),
                   "graceful_timeout_s": 5},
        "metrics": {"port": free_port()},
        "llama_server": {"binary": str(bin_path), "allowed_binary_prefixes": [str(bin_path.parent)],
                         "models_dir": str(models_dir or tmp / "models")},
        "supervision": {"runtime_dir": str(tmp / "run"), "state_dir": str(tmp / "state")},
        "models": models,
    }
    for name, values in (sections or {}).items():
        doc[name] = {**doc.get(name, {}), **values}
    path = tmp / "appliance.toml"
    path.write_text(render_toml(doc))
    return path, port


#: A stub serves any number of requests at once: its model's slots are above every concurrency the benchmarks use, so
#: the proxy's admission queue (which holds requests beyond ``parallel``) never holds one.
STUB_PARALLEL = 64


def link_model(models_dir: Path) -> None:
    """The installed model in a new ``models_dir``: the config checks that a model file lies under models_dir with
    symlinks followed, so the file itself is hard-linked there (or copied, across file systems)."""
    models_dir.mkdir()
    try:
        os.link((MODELS / MODEL_FILE).resolve(), models_dir / MODEL_FILE)
    except OSError:
        shutil.copyfile(MODELS / MODEL_FILE, models_dir / MODEL_FILE)


def stub_model(port: int) -> dict[str, Any]:
    """A chat model served by a stub; its slots and queue bound (parallel + max_queue) never hold the benchmark's
    load back."""
    return {"name": "bench", "file": "bench.gguf", "kind": "chat", "port": port, "parallel": STUB_PARALLEL,
            "max_queue": 100_000}


def start_appliance_up(kids: Children, config: Path, log: Path, name: str = "appliance up", port: int | None = None
                       ) -> None:
    """The whole appliance as an operator runs it from a checkout (``python -m appliance up``: supervisord, the
    models, the proxy); with ``port``, until its /health answers 200. It stops its models on SIGTERM after the proxy
    drained, hence the long stop wait."""
    kids.start(name, [PYTHON, "-m", "appliance", "up", "--config", str(config)], log, stop_wait_s=90)
    if port is not None:
        wait_ok(kids, name, "GET", f"http://{LOOPBACK}:{port}/health", timeout_s=180)


def start_appliance_proxy(kids: Children, tmp: Path, config: Path, port: int, tree: Path | None = None
                          ) -> subprocess.Popen[bytes]:
    """The proxy exactly as supervisord runs it: ``python -m gunicorn -c GUNICORN_CONF`` with $APPLIANCE_CONFIG.

    ``tree``: a directory holding another version of the ``appliance`` package (bench.commits), run instead of this
    checkout's: it comes first on the workers' import path."""
    name, conf, env, cwd = "appliance proxy", GUNICORN_CONF, {"APPLIANCE_CONFIG": str(config)}, REPO
    if tree is not None:
        name, conf, cwd = f"appliance proxy ({tree})", str(tree / "appliance" / "gunicorn_conf.py"), tree
        env["PYTHONPATH"] = str(tree)
    proc = kids.start(name, [PYTHON, "-m", "gunicorn", "-c", conf], tmp / "proxy.log", env, cwd=cwd)
    wait_ok(kids, name, "GET", f"http://{LOOPBACK}:{port}/health")
    return proc


def start_bare_proxy(kids: Children, tmp: Path, upstream_port: int, client: str = "aiohttp"
                     ) -> tuple[int, subprocess.Popen[bytes]]:
    """bench/bare_proxy.py under the appliance's gunicorn settings (2 workers, uvloop, httptools, keep-alive 5 s)."""
    port = free_port()
    argv = [PYTHON, "-m", "gunicorn", "--workers", "2", "--worker-class", "bench.bare_proxy.BareWorker",
            "--bind", f"{LOOPBACK}:{port}", "--keep-alive", "5", "--log-level", "warning", "bench.bare_proxy:app"]
    proc = kids.start("bare proxy", argv, tmp / "bare_proxy.log",
                      {"BARE_PROXY_UPSTREAM": f"http://{LOOPBACK}:{upstream_port}", "BARE_PROXY_CLIENT": client})
    return port, proc


# ---------------------------------------------------------------------------------------------------------- CPU time

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: the fields start after the last ')'.
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(root: int) -> float:
    """utime + stime of a live process tree (gunicorn's arbiter and workers, nginx's master and workers)."""
    ticks = 0
    for pid in process_tree(root):
        if (fields := _stat_fields(pid)) is not None:
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / _CLK_TCK


def idle_cpu_per_s(root: int, seconds: float = 3.0) -> float:
    """CPU seconds per second the tree spends with no traffic (gunicorn's heartbeats, the appliance's readiness
    polls): subtracted from a run's CPU time, so that what is left is the cost of the traffic itself."""
    cpu0 = cpu_seconds(root)
    time.sleep(seconds)
    return (cpu_seconds(root) - cpu0) / seconds


# ---------------------------------------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers and socket errors (connect, read, write, timeout)


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(token: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", token)
    if m is None:
        raise ValueError(f"unexpected wrk latency {token!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    requests = re.search(r"^\s*(\d+) requests in ", out, re.M)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M)
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    if requests is None or rps is None or p50 is None or p99 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    if (non2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) is not None:
        errors += int(non2xx.group(1))
    return WrkResult(int(requests.group(1)), float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), errors)


def wrk_script(tmp: Path, body: str, headers: Mapping[str, str], name: str = "post.lua") -> Path:
    """POST ``body`` with ``headers`` (wrk's own way to send a body)."""
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{body}]==]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path = tmp / name
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> WrkResult:
    """One thread (the machine's other cores belong to the proxy under test), ``connections`` connections."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
            "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def measured_wrk(url: str, script: Path, connections: int, seconds: int, warmup_s: int = 1, root: int | None = None,
                 idle_per_s: float = 0.0) -> tuple[WrkResult, float | None]:
    """A wrk run after ``warmup_s`` of unmeasured load, and the CPU seconds per 1,000 requests of the process tree
    ``root`` over the run, less its rate at rest (``idle_per_s``); None without a root."""
    if warmup_s > 0:
        run_wrk(url, script, connections, warmup_s)
    cpu0, t0 = cpu_seconds(root) if root is not None else 0.0, time.monotonic()
    w = run_wrk(url, script, connections, seconds)
    if root is None or not w.requests:
        return w, None
    return w, (cpu_seconds(root) - cpu0 - idle_per_s * (time.monotonic() - t0)) / w.requests * 1000


def check_same_answer(kids: Children, urls: Mapping[str, str], stub_url: str) -> None:
    """Every path must hand back the stub's exact bytes for the small chat request, or the comparison is not of like
    with like."""
    expected = wait_ok(kids, "the stub", "POST", stub_url, CHAT_REQUEST.encode(), AUTH_HEADERS)
    for name, url in urls.items():
        body = wait_ok(kids, name, "POST", url, CHAT_REQUEST.encode(), AUTH_HEADERS)
        if body != expected:
            raise RuntimeError(f"{name} answered {body[:200]!r}, not the stub's {expected[:200]!r}")


# ---------------------------------------------------------------------------------------------------------- output


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "not installed"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0].split(" Copyright")[0] if text else "?"


def machine_summary(load_only: bool = False) -> str:
    """What a figure must be read with: the machine, how busy it was, the tools' versions."""
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    if load_only:
        return f"machine at the end: {load}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return (f"machine: {cpu}, {os.cpu_count()} CPUs, {load}; Python {sys.version.split()[0]}; "
            f"{_version([NGINX, '-v'])}; {_version(['wrk', '-v'])}")


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))]


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns right-aligned except the first."""
    body = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in body) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(body[0]), "  ".join("-" * w for w in widths), *(line(r) for r in body[1:])])


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)  # value != value: NaN
