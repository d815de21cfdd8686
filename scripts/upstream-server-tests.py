#!/usr/bin/env python3
"""llama.cpp's own server tests, run against llama-server directly and through the appliance, compared test by test.

The suite (``tools/server/tests`` of the pinned llama.cpp source) is copied to a temporary directory and run twice with
pytest, in a throwaway virtual environment holding its requirements:

* ``direct``: as upstream runs it, its ``ServerProcess`` starting llama-server, on the local model;
* ``appliance``: each llama-server the suite starts gets the appliance's proxy in front of it (gunicorn with the
  appliance's own settings, the llama-server configured as the model's upstream), on the port the test talks to.

This file is also the pytest plugin that does it (loaded as ``appliance_shim`` from the copy): every preset's model
download becomes the local GGUF, and in ``appliance`` mode ``ServerProcess.start``/``stop`` also start and stop a proxy.
It prints what passed each way and every test that passes directly but not through the appliance, grouped by reason;
exit status 1 when there is any such test.

    .venv/bin/python scripts/upstream-server-tests.py --parallel --recheck [-k EXPR] [FILE or TEST ...]

docs/testing.md has what the last run found.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BINARY = REPO / ".appliance" / "bin" / "llama-server"
MODEL = REPO / ".appliance" / "models" / "gemma-3-270m-q4_k_m.gguf"
MODES = ("direct", "appliance")
SUITE_DIR = "tools/server/tests/"
TEMPLATES_DIR = "models/templates/"
PLUGIN = "appliance_shim"

# The environment the runner hands the plugin.
ENV_MODE = "APPLIANCE_SHIM_MODE"
ENV_MODEL = "APPLIANCE_SHIM_MODEL"
ENV_PYTHON = "APPLIANCE_SHIM_PYTHON"
ENV_REPO = "APPLIANCE_SHIM_REPO"
ENV_WORK = "APPLIANCE_SHIM_WORK"

# Model names the suite sends (OpenAI SDK defaults, its own placeholders): what an operator would map onto a model
# with alias patterns. "*" alone is refused by the config (unknown names must still get 404).
ALIASES = ("test", "gpt-*", "davinci-*", "text-embedding-*", "claude-*", "codellama*", "ggml-org/*")
PROXY_START_S = 60.0
# The report property that holds the appliance's own error answers during a test.
ANSWERS = "appliance_answers"
_answers: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ----------------------------------------------------------------------------------------------- the pytest plugin


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


def _render(doc: dict[str, dict[str, object]], models: list[dict[str, object]]) -> str:
    out: list[str] = []
    for section, values in doc.items():
        out += [f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in values.items()), ""]
    for m in models:
        out += ["[[models]]", *(f"{k} = {_toml(v)}" for k, v in m.items()), ""]
    return "\n".join(out)


def _proxy_config(server: Any, upstream_port: int, public_port: int, run_dir: Path) -> Path:
    """The config an operator would write for this llama-server: the same kind, key, CORS origins and names."""
    model = Path(os.environ[ENV_MODEL])
    names = [n.strip() for n in (server.model_alias or "gemma-3-270m").split(",") if n.strip()]
    kind = "embed" if server.server_embeddings else "rerank" if server.server_reranking else "chat"
    server_doc: dict[str, object] = {
        "bind": [h.strip() for h in server.server_host.split(",")], "port": public_port, "workers": 2,
        # The suite's own per-request timeout; the proxy's default (120 s) would cut its longest generations.
        "request_timeout_s": 600, "graceful_timeout_s": 2,
    }
    if server.api_key:
        keys = run_dir / "api_keys"
        keys.write_text(f"suite: {server.api_key}\n")
        server_doc["api_keys_file"] = str(keys)
    if server.cors_origins:
        server_doc["cors_allow_origins"] = [o.strip() for o in server.cors_origins.split(",")]
    doc: dict[str, dict[str, object]] = {
        "server": server_doc,
        "metrics": {"port": free_port()},
        "llama_server": {"binary": str(Path(os.environ[ENV_REPO]) / ".appliance" / "bin" / "llama-server"),
                         "allowed_binary_prefixes": [str(Path(os.environ[ENV_REPO]) / ".appliance" / "bin")],
                         "models_dir": str(model.parent)},
        "supervision": {"runtime_dir": str(run_dir / "run"), "state_dir": str(run_dir / "state")},
    }
    aliases = [a for a in dict.fromkeys((*names[1:], *ALIASES)) if a != names[0]]
    # A large queue bound: the suite's concurrent requests must queue in llama-server, as they do directly.
    entry: dict[str, object] = {"name": names[0], "aliases": aliases, "file": model.name, "kind": kind,
                                "port": upstream_port, "parallel": server.n_slots or 4, "max_queue": 1000}
    if server.n_ctx:
        entry["ctx_size"] = server.n_ctx
    path = run_dir / "appliance.toml"
    path.write_text(_render(doc, [entry]))
    return path


def _wait_proxy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + PROXY_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"appliance proxy exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"appliance proxy not ready within {PROXY_START_S:g} s:\n{log.read_text()[-3000:]}")


def _start_proxy(server: Any, upstream_port: int) -> tuple[subprocess.Popen[bytes], Path]:
    run_dir = Path(tempfile.mkdtemp(prefix="proxy-", dir=os.environ[ENV_WORK]))
    config = _proxy_config(server, upstream_port, server.server_port, run_dir)
    repo = Path(os.environ[ENV_REPO])
    log = run_dir / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([os.environ[ENV_PYTHON], "-m", "gunicorn", "-c",
                                 str(repo / "appliance" / "gunicorn_conf.py")],
                                cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "APPLIANCE_CONFIG": str(config)})
    host = server.server_host.split(",")[0].strip()
    try:
        _wait_proxy(proc, f"http://{host}:{server.server_port}/health", log)
    except BaseException:
        _stop_proxy(proc)
        raise
    return proc, run_dir


def _stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _localize(server: Any) -> None:
    """The presets download their models from a hub, unreachable here: every one runs the local GGUF instead."""
    if server.model_hf_repo or server.model_hf_file or server.model_url:
        server.model_hf_repo = server.model_hf_file = server.model_url = None
        server.model_file = os.environ[ENV_MODEL]
    server.mmproj_url = None
    server.offline = True


def _patch(utils: Any) -> None:
    cls = utils.ServerProcess
    original_init: Callable[[Any], None] = cls.__init__
    original_start: Callable[..., None] = cls.start
    original_stop: Callable[[Any], None] = cls.stop
    through_appliance = os.environ[ENV_MODE] == "appliance"

    @functools.wraps(original_init)
    def init(self: Any) -> None:
        original_init(self)
        # The suite's fixed 8080 (or $PORT) may be taken on a shared machine.
        self.server_port = free_port()

    @functools.wraps(original_start)
    def start(self: Any, *args: Any, **kwargs: Any) -> None:
        _localize(self)
        if not through_appliance:
            original_start(self, *args, **kwargs)
            return
        # Behind the appliance, llama-server runs on a loopback port of its own and without a key (the appliance owns
        # the keys and never forwards them), as the appliance itself runs it.
        public, key = self.server_port, self.api_key
        self.server_port, self.api_key = free_port(), None
        try:
            original_start(self, *args, **kwargs)
            upstream = self.server_port
        finally:
            self.server_port, self.api_key = public, key
        self._appliance_proxy = _start_proxy(self, upstream)

    @functools.wraps(original_stop)
    def stop(self: Any) -> None:
        proxy: tuple[subprocess.Popen[bytes], Path] | None = getattr(self, "_appliance_proxy", None)
        if proxy is not None:
            self._appliance_proxy = None
            _stop_proxy(proxy[0])
            shutil.rmtree(proxy[1], ignore_errors=True)
        original_stop(self)

    original_request: Callable[..., Any] = cls.make_request
    original_stream: Callable[..., Iterator[Any]] = cls.make_stream_request

    @functools.wraps(original_request)
    def make_request(self: Any, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        res = original_request(self, method, path, *args, **kwargs)
        _note(method, path, res.status_code, res.body)
        return res

    @functools.wraps(original_stream)
    def make_stream_request(self: Any, method: str, path: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from original_stream(self, method, path, *args, **kwargs)
        except utils.ServerError as e:
            _note(method, path, e.code, e.body)
            raise

    cls.__init__, cls.start, cls.stop = init, start, stop
    cls.make_request, cls.make_stream_request = make_request, make_stream_request
    # It starts every preset once to download its model: nothing to download here.
    utils.ServerPreset.load_all = staticmethod(lambda: None)


def _note(method: str, path: str, status: int, body: object) -> None:
    """Keep the appliance's own error answers (their ``code`` is a word; llama-server's is a number): why a test
    fails through the appliance, in its report."""
    error = body.get("error") if isinstance(body, dict) else None
    if status >= 400 and isinstance(error, dict) and isinstance(error.get("code"), str):
        _answers.append(f"{method} {path.split('?')[0]}: {status} {error['code']}")


def pytest_runtest_setup(item: Any) -> None:
    _answers.clear()


def pytest_runtest_teardown(item: Any) -> None:
    if _answers:
        item.user_properties.append((ANSWERS, "; ".join(dict.fromkeys(_answers))))


def pytest_configure(config: Any) -> None:
    """pytest hook, when this file is loaded as the plugin: the suite's conftest has imported ``utils`` by now."""
    _patch(importlib.import_module("utils"))


# ------------------------------------------------------------------------------------------------------ the runner


def say(message: str) -> None:
    print(f"[upstream-tests] {message}", flush=True)


def extract_suite(sdist: Path, dest: Path) -> Path:
    """``tools/server/tests`` of the sdist's llama.cpp tree, with the chat templates some tests read from
    ``../../../models/templates``, extracted under ``dest``; returns the suite's directory."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if any(d in m.name + "/" for d in (SUITE_DIR, TEMPLATES_DIR))]
        tar.extractall(dest, members=members, filter="data")
    suites = [p for p in dest.rglob("tests") if p.as_posix().endswith(SUITE_DIR.rstrip("/"))]
    if not suites:
        raise SystemExit(f"{sdist} holds no {SUITE_DIR}")
    return suites[0]


def make_venv(venv: Path, requirements: Path) -> Path:
    """A throwaway environment with the suite's requirements (and pytest-timeout), reused when it exists."""
    python = venv / "bin" / "python"
    if not python.exists():
        say(f"creating {venv} with {requirements.name} and pytest-timeout")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements), "pytest-timeout"],
                       check=True, timeout=900)
    return python


@contextlib.contextmanager
def session(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session, killed with everything it started (llama-servers, proxies) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_mode(mode: str, tests: list[str], tag: str, python: Path, suite: Path, work: Path,
             args: argparse.Namespace) -> Path:
    report = work / f"{mode}{tag}.xml"
    argv = [str(python), "-m", "pytest", "-p", PLUGIN, "-p", "no:cacheprovider", "-q", "-rN",
            # xunit1: the report keeps each test's properties (the appliance's answers).
            f"--timeout={args.timeout}", f"--junitxml={report}", "-o", "junit_family=xunit1",
            # Past it, pytest runs no further test and still writes its report.
            f"--session-timeout={args.total_timeout}",
            # Upstream's default run leaves out the tests marked slow (they need real models from the hub).
            *([] if args.slow else ["-m", "not slow"]), *(["-n", str(args.workers)] if args.workers > 1 else []),
            *(["-k", args.k] if args.k else []), *tests]
    env = {**os.environ, ENV_MODE: mode, ENV_MODEL: str(args.model), ENV_PYTHON: sys.executable,
           ENV_REPO: str(REPO), ENV_WORK: str(work), "LLAMA_SERVER_BIN_PATH": str(args.binary),
           "PYTHONPATH": str(suite)}
    log = work / f"{mode}{tag}.log"
    say(f"{mode}{tag}: {len(tests)} test paths (log: {log})")
    t0 = time.monotonic()
    with session(argv, suite, env, log) as proc:
        try:
            proc.wait(args.total_timeout + 2 * args.timeout)
        except subprocess.TimeoutExpired:
            say(f"{mode}{tag}: killed: still running {2 * args.timeout} s after --total-timeout")
    say(f"{mode}{tag}: done in {time.monotonic() - t0:.0f} s")
    if not report.exists():
        raise SystemExit(f"{mode}{tag}: pytest wrote no report; the end of {log}:\n{log.read_text()[-3000:]}")
    return report


def run_modes(tests: list[str], tag: str, parallel: bool, python: Path, suite: Path, work: Path,
              args: argparse.Namespace) -> dict[str, dict[str, Outcome]]:
    with ThreadPoolExecutor(len(args.modes) if parallel else 1) as pool:
        reports = {mode: pool.submit(run_mode, mode, tests, tag, python, suite, work, args) for mode in args.modes}
        return {mode: outcomes(report.result()) for mode, report in reports.items()}


Outcome = tuple[str, str]  # (passed | failed | skipped | missing, why)


def outcomes(report: Path) -> dict[str, Outcome]:
    """Test id -> its outcome; a failure's reason is what the appliance itself answered during the test, if it
    answered an error, else the failure message's first line."""
    out: dict[str, Outcome] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name', '')}"
        state, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                state = "failed"
                reason = (child.get("message") or child.text or child.tag).strip().splitlines()[0]
                break
            if child.tag == "skipped":
                state = "skipped"
        answers = [p.get("value", "") for p in case.iter("property") if p.get("name") == ANSWERS]
        if state == "failed" and answers:
            reason = "the appliance answered " + "; ".join(answers)
        out[test] = (state, reason)
    return out


def reason_key(reason: str) -> str:
    """A failure message without what varies per test (numbers, quoted text), to group like failures."""
    if reason.startswith("the appliance answered "):
        return reason
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason))[:200]


def passed(res: dict[str, Outcome], test: str) -> bool:
    return res.get(test, ("missing", ""))[0] == "passed"


def lost_tests(results: dict[str, dict[str, Outcome]]) -> list[str]:
    """The tests that pass directly but not through the appliance."""
    direct, through = results["direct"], results["appliance"]
    return sorted(t for t in direct if passed(direct, t) and not passed(through, t))


def compare(results: dict[str, dict[str, Outcome]], json_out: Path | None) -> int:
    direct, through = results["direct"], results["appliance"]
    for mode, res in results.items():
        counts = {s: sum(1 for st, _ in res.values() if st == s) for s in ("passed", "failed", "skipped")}
        say(f"{mode}: {len(res)} tests, " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    lost = lost_tests(results)
    gained = sorted(t for t in through if passed(through, t) and not passed(direct, t))
    groups: dict[str, list[str]] = defaultdict(list)
    for test in lost:
        groups[reason_key(through.get(test, ("missing", "not run through the appliance"))[1])].append(test)
    say(f"passed directly: {sum(passed(direct, t) for t in direct)}, "
        f"through the appliance: {sum(passed(through, t) for t in through)}")
    say(f"{len(lost)} pass directly but not through the appliance, by reason:")
    for key, tests in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"\n  {len(tests)} x {key}")
        for test in tests:
            print(f"      {test}: {through.get(test, ('', ''))[1][:300]}")
    if gained:
        say(f"{len(gained)} pass through the appliance but not directly: {', '.join(gained)}")
    if json_out:
        json_out.write_text(json.dumps({"results": results, "lost": lost, "gained": gained, "groups": groups},
                                       indent=1))
    return 1 if lost else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tests", nargs="*", help="test files or ids, relative to the suite (default: unit)")
    p.add_argument("-k", help="pytest -k expression")
    p.add_argument("--sdist", type=Path,
                   help="the llama.cpp source (default: the pinned one llama-server is built from, cached by setup)")
    p.add_argument("--binary", type=Path, default=BINARY, help="llama-server (default: %(default)s)")
    p.add_argument("--model", type=Path, default=MODEL, help="the GGUF every preset runs (default: %(default)s)")
    p.add_argument("--venv", type=Path, help="the suite's environment, made here when missing (default: temporary)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--timeout", type=int, default=120, help="seconds per test (pytest-timeout)")
    p.add_argument("--total-timeout", type=int, default=3 * 3600,
                   help="seconds per run of the suite: then no further test starts")
    p.add_argument("--parallel", action="store_true", help="run both modes at once")
    p.add_argument("--workers", type=int, default=1, help="pytest-xdist workers per mode (default: %(default)s)")
    p.add_argument("--slow", action="store_true", help="also the tests upstream marks slow")
    p.add_argument("--recheck", action="store_true",
                   help="run the tests that pass only directly again, in both modes one after the other, and keep "
                        "those outcomes")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, reports)")
    p.add_argument("--json", type=Path, help="write every outcome and the comparison here")
    args = p.parse_args()
    if args.sdist is None:
        # Imported here: this file is also the plugin, loaded where the appliance is not installed.
        from appliance.runtime.build import fetch_sdist

        args.sdist = fetch_sdist()
    for path in (args.sdist, args.binary, args.model):
        if not path.exists():
            raise SystemExit(f"{path} is missing (scripts/setup.sh installs the binary and the model)")
    work = Path(tempfile.mkdtemp(prefix="upstream-server-tests-"))
    try:
        suite = extract_suite(args.sdist, work)
        shutil.copyfile(Path(__file__), suite / f"{PLUGIN}.py")
        python = make_venv(args.venv or work / "venv", suite / "requirements.txt")
        results = run_modes(args.tests or ["unit"], "", args.parallel, python, suite, work, args)
        if len(results) < len(MODES):
            for mode, res in results.items():
                say(f"{mode}: " + ", ".join(f"{t}: {st}" for t, (st, _) in sorted(res.items())))
            return 0
        suspects = lost_tests(results)
        if args.recheck and suspects:
            # A test that timed out under load (both runs at once, other work on the host) is not a difference.
            say(f"rechecking the {len(suspects)} tests that passed only directly, one run at a time")
            for mode, res in run_modes(suspects, "-recheck", False, python, suite, work, args).items():
                results[mode].update(res)
        return compare(results, args.json)
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
