"""Gather one host's status into typed dataclasses: supervisord (its unix socket), the proxy's /health, each
llama-server's /metrics on 127.0.0.1, the shared in-flight counters and the model manager's status file.

Busy slots come from llama-server's ``/metrics`` (``llamacpp:requests_processing``), not its ``/slots``: the launcher
always passes ``--metrics`` (the exporter scrapes it), one request per model also gives the counters for tokens/s,
and ``/slots`` would hand this command every user's prompt text, which an operator's status screen has no business
reading.

Tokens/s is slot steps per second: every ``llama_decode`` call advances each busy slot by one token, and
``n_decode_total x n_busy_slots_per_decode`` (both since start) is the number of such steps. Not
``tokens_predicted_total``: llama-server adds a request's tokens to it only when the request ends, so a host busy with
long streams would show 0. A prompt batch counts as one step per slot, so prompt-heavy traffic reads a little high.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import CPU, ApplianceConfig, ModelConfig
from appliance.lifecycle import plan
from appliance.metrics import read_restarts
from appliance.runtime.names import EVENTS_PROGRAM, EXPORTER_PROGRAM, LIFECYCLE_PROGRAM, PROXY_PROGRAM, program_name
from appliance.runtime.supervisor_conf import runtime_paths
from appliance.runtime.supervisor_rpc import all_process_info
from appliance.runtime.up import _PROBE_TLS
from appliance.shared import hostload, modelstate

HTTP_TIMEOUT_S = 2.0
#: tokens/s is averaged over the samples of the last minute (``--watch``); a one-shot run has two, a second apart.
RATE_WINDOW_S = 60.0
_DECODES = "llamacpp:n_decode_total"
_BUSY_PER_DECODE = "llamacpp:n_busy_slots_per_decode"
_PROCESSING = "llamacpp:requests_processing"
#: States in which the model manager holds an on-demand model's memory.
_HOLDING = ("ready", "loading", "unloading")
_LOG_TAIL_BYTES = 64 * 1024
_LOG_PREFIX = re.compile(r"(?:(?<=; )|^)[\d.]+ [A-Z] +")


@dataclass(frozen=True)
class Memory:
    device: str
    mib: int
    #: "rss" (measured, /proc), "reserved" (the model manager's plan for a loaded model) or "estimate" (GGUF).
    source: str


@dataclass(frozen=True)
class ModelStatus:
    name: str
    kind: str
    load: str
    port: int
    state: str
    #: Unix time of the last state change, where known.
    since: float | None
    restarts: int
    pid: int | None
    slots_busy: int | None
    slots_total: int
    #: Requests beyond ``parallel`` in flight on the proxy plus requests waiting for an on-demand load.
    waiting: int | None
    tokens_per_s: float | None
    memory: tuple[Memory, ...]
    last_error: str


@dataclass(frozen=True)
class ProgramStatus:
    name: str
    state: str
    pid: int | None
    uptime_s: float | None
    detail: str


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    host: str
    config: str
    health_url: str
    #: The proxy's /health "status" (ok, starting, unhealthy, draining), or "unreachable".
    health: str
    #: Seconds that tokens/s is averaged over (0 before there are two samples).
    tokens_window_s: float
    models: tuple[ModelStatus, ...]
    programs: tuple[ProgramStatus, ...]
    #: Why the host is not healthy; empty when it is.
    problems: tuple[str, ...]
    #: What could not be read (shown as "-"), which says nothing about the host's health.
    notes: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.problems


@dataclass
class TokenSampler:
    """Slot steps (tokens) per model over time, each sample timed when its model answered."""

    window_s: float = RATE_WINDOW_S
    samples: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)

    def add(self, model: str, at: float, steps: float | None) -> None:
        """``None``: the model did not answer; its earlier samples would give a rate it no longer has."""
        if steps is None:
            self.samples.pop(model, None)
            return
        q = self.samples.setdefault(model, deque())
        q.append((at, steps))
        while len(q) > 2 and at - q[1][0] >= self.window_s:
            q.popleft()

    def span_s(self) -> float:
        return max((q[-1][0] - q[0][0] for q in self.samples.values()), default=0.0)

    def rate(self, model: str) -> float | None:
        q = self.samples.get(model)
        if q is None or len(q) < 2 or q[-1][0] <= q[0][0]:
            return None
        # A drop is a restarted llama-server (or the counters' rounding): that interval counts nothing.
        produced = sum(max(0.0, b - a) for (_, a), (_, b) in itertools.pairwise(q))
        return produced / (q[-1][0] - q[0][0])


def health_url(cfg: ApplianceConfig) -> str:
    host = cfg.server.bind[0]
    # A wildcard bind is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    scheme = "https" if cfg.server.tls_cert_file else "http"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{cfg.server.port}/health"


def _get(url: str) -> tuple[int, bytes] | None:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S, context=_PROBE_TLS) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:  # /health answers 503 with its document while not ok
        return e.code, e.read()
    except (OSError, ValueError):
        return None


def _child_metrics(m: ModelConfig) -> tuple[float, dict[str, float] | None]:
    """(when it answered, the unlabelled samples of a llama-server's /metrics or None when it did not answer 200)."""
    got = _get(f"http://127.0.0.1:{m.port}/metrics")
    at = time.time()
    if got is None or got[0] != 200:
        return at, None
    values: dict[str, float] = {}
    for line in got[1].decode(errors="replace").splitlines():
        name, _, value = line.partition(" ")
        if name and not name.startswith("#") and "{" not in name:
            with contextlib.suppress(ValueError):
                values[name] = float(value.strip())
    return at, values


def _steps(values: dict[str, float] | None) -> float | None:
    """Slot steps since the llama-server started (the module's docstring says why)."""
    if values is None or _DECODES not in values or _BUSY_PER_DECODE not in values:
        return None
    return values[_DECODES] * values[_BUSY_PER_DECODE]


def _read_json(path: Path) -> tuple[dict[str, Any], str]:
    """(document, "") or ({}, why it could not be read); a missing file is no problem."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, ""
    except PermissionError:
        return {}, f"cannot read {path}: permission denied"
    except (OSError, ValueError) as e:
        return {}, f"cannot read {path}: {e}"
    return (doc, "") if isinstance(doc, dict) else ({}, f"{path}: not a JSON object")


def _rss_mib(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return None


def _log_error(cfg: ApplianceConfig, m: ModelConfig) -> str:
    """Why a model failed, from the tail of its log, as the model manager words a failed load (no paths), without
    llama.cpp's time stamp and level letter."""
    from appliance.lifecycle.manager import log_reason

    path = cfg.log_dir / f"{program_name(m)}.log"
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            return _LOG_PREFIX.sub("", log_reason(f.read().decode(errors="replace")))
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"


def _memory_list(memory: dict[str, int], source: str) -> tuple[Memory, ...]:
    return tuple(Memory(d, int(mib), source) for d, mib in sorted(memory.items()))


def _derived_state(m: ModelConfig, statename: str, answering: bool, managed: dict[str, Any]) -> str:
    """A model's state as /health would name it, for when the proxy does not answer."""
    if m.on_demand and managed.get("state"):
        return str(managed["state"])
    if statename == "FATAL":
        return "failed"
    if answering:
        return "ready"
    if statename in ("STOPPED", "STOPPING", ""):  # "": supervisord runs nothing, or nothing it says can be read
        return "stopped"
    return "restarting" if statename in ("BACKOFF", "EXITED") else "loading"


def _supervisor(sock: Path, problems: list[str]) -> dict[str, dict[str, Any]]:
    """supervisord's view of every program by name; empty, with the reason in ``problems``, when it cannot be had."""
    try:
        return {i["name"]: i for i in all_process_info(sock)}
    except (FileNotFoundError, ConnectionRefusedError):
        problems.append(f"not running: no supervisord listens on {sock} (is the service or `appliance up` running?)")
    except PermissionError:
        problems.append(f"cannot connect to {sock}: permission denied (run as the service user or a member of its "
                        "group; docs/operations.md)")
    except (OSError, xmlrpc.client.Error) as e:
        problems.append(f"supervisord at {sock} did not answer: {e}")
    return {}


def _health(got: tuple[int, bytes] | None) -> tuple[str, dict[str, Any]]:
    """(the /health "status", its document) from the proxy's answer."""
    if got is None:
        return "unreachable", {}
    doc: Any = None
    with contextlib.suppress(ValueError):
        doc = json.loads(got[1])
    if not isinstance(doc, dict):
        return f"HTTP {got[0]}", {}
    return str(doc.get("status", f"HTTP {got[0]}")), doc


class Collector:
    """Collects snapshots of one host; keeps the token samples and the GGUF estimates between them (``--watch``)."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.sampler = TokenSampler()
        self._estimates: dict[str, dict[str, int]] = {}
        self._pool = ThreadPoolExecutor(max_workers=min(16, len(cfg.models) + 1))

    def sample_tokens(self) -> dict[str, dict[str, float] | None]:
        """Every model's /metrics, fetched concurrently, with the token counters added to the samples."""
        got = {}
        for m, (at, values) in zip(self.cfg.models, self._pool.map(_child_metrics, self.cfg.models), strict=True):
            got[m.name] = values
            self.sampler.add(m.name, at, _steps(values))
        return got

    def _estimate(self, m: ModelConfig) -> dict[str, int]:
        if m.name not in self._estimates:
            try:
                self._estimates[m.name] = plan.footprint(m).mib
            except plan.PlanError:
                self._estimates[m.name] = {}
        return self._estimates[m.name]

    def _memory(self, m: ModelConfig, state: str, pid: int | None, managed: dict[str, Any]) -> tuple[Memory, ...]:
        if m.on_demand:
            need = managed.get("memory_mib")
            return _memory_list(need, "reserved") if state in _HOLDING and isinstance(need, dict) else ()
        if pid is None:
            return ()
        # CPU memory is measured; a GPU's is the plan's estimate (this command reads no GPU driver).
        out = {d: Memory(d, mib, "estimate") for d, mib in self._estimate(m).items() if d != CPU}
        rss = _rss_mib(pid)
        if rss is not None:
            out[CPU] = Memory(CPU, rss, "rss")
        return tuple(out[d] for d in sorted(out))

    def collect(self) -> Snapshot:
        cfg = self.cfg
        problems: list[str] = []
        health_future = self._pool.submit(_get, health_url(cfg))
        metrics = self.sample_tokens()
        infos = _supervisor(runtime_paths(cfg)["socket"], problems)
        health, health_doc = _health(health_future.result())
        if health != "ok":
            problems.append(f"proxy /health: {health}")
        health_models = health_doc.get("models")
        health_models = health_models if isinstance(health_models, dict) else {}

        status_doc: dict[str, Any] = {}
        why = ""
        if any(m.on_demand for m in cfg.models):
            status_doc, why = _read_json(modelstate.status_file(cfg))
        notes = [why] if why else []
        managed_all = status_doc.get("models")
        managed_all = managed_all if isinstance(managed_all, dict) else {}
        in_flight = self._in_flight(notes)
        restarts = read_restarts(cfg)

        models = []
        for m in cfg.models:
            info = infos.get(program_name(m), {})
            managed = managed_all.get(m.name) or {}
            from_health = health_models.get(m.name) or {}
            statename = str(info.get("statename", ""))
            pid = int(info["pid"]) if info.get("pid") else None
            child = metrics[m.name]
            state = str(from_health.get("state") or _derived_state(m, statename, child is not None, managed))
            since = from_health.get("since") or managed.get("since") or info.get("start") or None
            error = str(from_health.get("error") or managed.get("last_error") or "")
            if not error and state == "failed":
                error = _log_error(cfg, m) or str(info.get("spawnerr") or info.get("description") or "")
            waiting = None
            if m.name in in_flight:
                waiting = max(0, in_flight[m.name] - m.parallel) + int(managed.get("waiting", 0))
            busy = child.get(_PROCESSING) if child is not None else None
            models.append(ModelStatus(
                name=m.name, kind=m.kind, load=m.load, port=m.port, state=state,
                since=float(since) if since else None,
                restarts=int(from_health.get("restarts", restarts.get(program_name(m), 0))),
                pid=pid, slots_busy=int(busy) if busy is not None else None, slots_total=m.parallel,
                waiting=waiting, tokens_per_s=self.sampler.rate(m.name),
                memory=self._memory(m, state, pid, managed), last_error=error))
            if state in ("failed", "stopped", "restarting") or (state == "loading" and not m.on_demand):
                problems.append(f"model {m.name}: {state}" + (f" ({error})" if error else ""))

        programs = self._programs(infos)
        if infos:
            problems += [f"program {p.name}: {p.state}" for p in programs if p.state != "RUNNING"]
        return Snapshot(taken_at=time.time(), host=socket.gethostname(), config=str(cfg.source or ""),
                        health_url=health_url(cfg), health=health, tokens_window_s=round(self.sampler.span_s(), 1),
                        models=tuple(models), programs=programs, problems=tuple(problems), notes=tuple(notes))

    def _in_flight(self, notes: list[str]) -> dict[str, int]:
        directory = hostload.load_dir(self.cfg)
        # hostload.in_flight reads an unreadable file as zero; an operator must not see "0 waiting" for "unknown".
        slots = directory / "slots"
        if slots.exists() and not os.access(slots, os.R_OK):
            notes.append(f"cannot read {slots}: permission denied (requests waiting unknown)")
            return {}
        return hostload.in_flight(directory, (m.name for m in self.cfg.models))

    def _programs(self, infos: dict[str, dict[str, Any]]) -> tuple[ProgramStatus, ...]:
        cfg = self.cfg
        wanted = [(PROXY_PROGRAM, f"{cfg.server.workers} workers, {', '.join(cfg.server.bind)} port "
                                  f"{cfg.server.port}"),
                  (EXPORTER_PROGRAM, f"127.0.0.1 port {cfg.metrics.port}"),
                  (EVENTS_PROGRAM, "supervisord event listener")]
        if any(m.on_demand for m in cfg.models):
            wanted.append((LIFECYCLE_PROGRAM, "model manager (on-demand models)"))
        out = []
        for name, detail in wanted:
            info = infos.get(name, {})
            state = str(info.get("statename", "UNKNOWN"))
            running = state == "RUNNING" and info.get("start")
            out.append(ProgramStatus(name, state, int(info["pid"]) if info.get("pid") else None,
                                     float(info["now"]) - float(info["start"]) if running else None, detail))
        return tuple(out)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
