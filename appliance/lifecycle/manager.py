"""The model manager: loads on-demand models when requests need them and unloads them, within the memory budgets.

One process per host (supervisord's ``lifecycle`` program) decides, so concurrent first requests on every proxy worker
share one load. It starts and stops the models' supervisord programs, and reads three things every tick:
supervisord's process states (an operator's ``supervisorctl start|stop`` is accounted for), the workers' shared request
counters (``appliance.shared.hostload``: in flight, and admitted ever, which shows use however short), and a loading
model's own ``/health``.

The policy:
- A model with anything in flight is never stopped. Unloading goes through CLOSING (``appliance.shared.modelstate``):
  new requests for the model wait for its next turn, the ones in flight finish, then it stops.
- Waiting models get their turn in the order their first request arrived (no model starves). The first one is loaded
  as soon as it fits; to make room, idle on-demand models go first, least recently used first.
- No thrash: a loaded model keeps its memory for ``server.min_residency_s`` while it is in use, serving its waiting
  requests and those that arrive meanwhile; after that it closes when another model waits for its memory.
- A load that fails answers its waiting requests at once with the reason from llama-server's log, frees the budget,
  and is tried again only by a later request, after a backoff that doubles (``supervision.backoff_*``).
- Idle models (``idle_unload_s``) are unloaded; ``always`` models are never touched.

Workers ask over a unix socket, one connection per waiting request: a JSON line with the model's name, answered by one
JSON line when the model is ready or cannot be. A worker that closes the connection (its client left) gives up its
place.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import xmlrpc.client
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig, ModelConfig, load
from appliance.events.sink import append_jsonl
from appliance.lifecycle import plan
from appliance.lifecycle.client import socket_path
from appliance.runtime import supervisor_rpc
from appliance.runtime.names import program_name
from appliance.shared import hostload, modelstate
from appliance.shared.modelstate import CLOSING, FAILED, LOAD_BUCKETS, LOADING, READY, UNLOADED

log = logging.getLogger("appliance.lifecycle")

TICK_S = 0.1
#: After CLOSING is set, how long before the in-flight count is trusted: a worker that read READY just before has
#: long since counted its request by then.
CLOSE_GRACE_S = 0.05
#: Within its residency, a model with nothing in flight and no request admitted for this long counts as idle.
IDLE_S = 1.0
_PATH = re.compile(r"(?:[A-Za-z]:)?/[^\s'\"():,]+")
_REASON = re.compile(r"error|fail|unable|cannot|out of memory|invalid|not enough", re.IGNORECASE)


def log_reason(text: str) -> str:
    """The reason a load failed, from llama-server's log since the load began, without paths."""
    lines = [line.strip() for line in text.splitlines() if _REASON.search(line)]
    lines = [line for line in lines if "exiting due to" not in line] or lines
    picked: list[str] = []
    for line in reversed(lines):
        clean = _PATH.sub("<file>", line)
        if clean not in picked:
            picked.insert(0, clean)
        if len(picked) == 2:
            break
    return "; ".join(picked)


@dataclass
class Waiter:
    future: asyncio.Future[dict[str, Any]]
    since: float


@dataclass
class Run:
    """What the manager knows of one on-demand model."""

    model: ModelConfig
    need: dict[str, int]
    state: int = UNLOADED
    since: float = field(default_factory=time.time)
    loaded_at: float = 0.0
    load_started: float = 0.0
    load_reason: str = "request"
    log_offset: int = 0
    last_use: float = 0.0
    admitted: int = -1
    in_flight: int = 0
    waiters: list[Waiter] = field(default_factory=list)
    #: Why it is closing: idle or evicted; also marks a stop of our own (anything else is the operator's).
    closing_reason: str = ""
    closing_since: float = 0.0
    stopping: bool = False
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    loads: int = 0
    unloads: dict[str, int] = field(default_factory=dict)
    load_seconds: list[int] = field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))
    load_seconds_sum: float = 0.0


class Manager:
    def __init__(self, cfg: ApplianceConfig, footprints: dict[str, plan.Footprint]) -> None:
        self.cfg = cfg
        self.budget = cfg.memory
        self.runs = {m.name: Run(m, footprints[m.name].mib) for m in cfg.models if m.on_demand}
        # always models hold their memory from the start, whatever their state.
        self.fixed: dict[str, int] = {}
        for m in cfg.models:
            if not m.on_demand:
                plan.add(self.fixed, footprints[m.name].mib)
        self.states = modelstate.ModelStates(modelstate.state_dir(cfg), tuple(self.runs))
        self.queue: list[str] = []
        self.rpc_socket = Path(cfg.supervision.runtime_dir) / "supervisor.sock"
        self.load_dir = hostload.load_dir(cfg)
        self.wake = asyncio.Event()
        self._status = ""
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a supervisord call beside the loop (a stop waits for the process to exit)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the workers' side ----

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            name = json.loads(line).get("model") if line else None
            run = self.runs.get(name) if isinstance(name, str) else None
            if run is None:
                answer: dict[str, Any] = {"ok": False, "status": 404, "code": "model_not_found",
                                          "message": f"{name!r} is not an on-demand model of this host"}
            else:
                waiter = Waiter(asyncio.get_running_loop().create_future(), time.monotonic())
                self._add_waiter(run, waiter)
                gone = asyncio.ensure_future(reader.read(1))  # EOF: the worker gave up (its client left)
                await asyncio.wait((waiter.future, gone), return_when=asyncio.FIRST_COMPLETED)
                gone.cancel()
                if not waiter.future.done():
                    run.waiters.remove(waiter)
                    self.wake.set()
                    return
                answer = {**waiter.future.result(), "waited_s": round(time.monotonic() - waiter.since, 3)}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, ValueError, AttributeError) as e:
            log.debug("a worker's request failed: %s", e)
        finally:
            writer.close()

    def _add_waiter(self, run: Run, waiter: Waiter) -> None:
        now = time.monotonic()
        if run.state == READY:
            waiter.future.set_result({"ok": True})
            return
        if run.state == FAILED and now < run.retry_at:
            waiter.future.set_result(self._failed_answer(run, now))
            return
        if len(run.waiters) >= run.model.queue_limit:
            # Waiting requests are not in flight (they hold no memory), so the queue bound is kept here.
            waiter.future.set_result({
                "ok": False, "status": 429, "code": "rate_limit_exceeded", "retry_after": 1,
                "message": f"model {run.model.name!r} has {run.model.queue_limit} requests waiting for its load on "
                           "this host (parallel + max_queue); retry shortly"})
            return
        run.waiters.append(waiter)
        if run.model.name not in self.queue:
            self.queue.append(run.model.name)
        self.wake.set()

    def _failed_answer(self, run: Run, now: float) -> dict[str, Any]:
        return {"ok": False, "status": 503, "code": "model_load_failed", "retry_after": max(1, math.ceil(
            run.retry_at - now)), "message": f"model {run.model.name!r} failed to load: {run.last_error}; it is "
                "tried again after a backoff"}

    def _answer(self, run: Run, answer: dict[str, Any]) -> None:
        for w in run.waiters:
            if not w.future.done():
                w.future.set_result(answer)
        run.waiters.clear()
        if run.model.name in self.queue:
            self.queue.remove(run.model.name)

    # ---- state ----

    def _set(self, run: Run, state: int) -> None:
        if run.state != state:
            run.state = state
            run.since = time.time()
            self.states.set(run.model.name, state)

    def _event(self, run: Run, kind: str, **fields: Any) -> None:
        event = {"ts": round(time.time(), 3), "event": "lifecycle", "type": kind,
                 "program": program_name(run.model), "model": run.model.name, **fields}
        try:
            append_jsonl(self.cfg.events_file, [event], self.cfg.events.max_bytes, self.cfg.events.backups)
        except OSError as e:
            log.warning("cannot record %s of %s: %s", kind, run.model.name, e)

    def _unloaded(self, run: Run, reason: str) -> None:
        run.unloads[reason] = run.unloads.get(reason, 0) + 1
        run.closing_reason = ""
        run.stopping = False
        self._set(run, UNLOADED)
        self._event(run, "model_unloaded", reason=reason)
        log.info("%s unloaded (%s)", run.model.name, reason)

    def used(self) -> dict[str, int]:
        total = dict(self.fixed)
        for run in self.runs.values():
            if run.state in (LOADING, READY, CLOSING):
                plan.add(total, run.need)
        return total

    def _log_size(self, run: Run) -> int:
        try:
            return (self.cfg.log_dir / f"{program_name(run.model)}.log").stat().st_size
        except OSError:
            return 0

    def _log_since(self, run: Run) -> str:
        try:
            with open(self.cfg.log_dir / f"{program_name(run.model)}.log", "rb") as f:
                f.seek(run.log_offset)
                return f.read(1 << 20).decode(errors="replace")
        except OSError:
            return ""

    # ---- supervisord ----

    async def _rpc(self, method: str, *args: Any) -> Any:
        def call() -> Any:
            return getattr(supervisor_rpc.server(self.rpc_socket).supervisor, method)(*args)
        return await asyncio.to_thread(call)

    def _begin_load(self, run: Run, reason: str) -> None:
        run.load_started = time.monotonic()
        run.load_reason = reason
        run.log_offset = self._log_size(run)
        self._set(run, LOADING)
        log.info("loading %s (%s)", run.model.name, reason)

    async def _start(self, run: Run) -> None:
        self._begin_load(run, "request")
        try:
            await self._rpc("startProcess", program_name(run.model), False)
        except (OSError, xmlrpc.client.Error) as e:
            if "ALREADY_STARTED" not in str(e):
                self._fail(run, f"supervisord could not start it ({e})")

    async def _stop(self, run: Run) -> None:
        run.stopping = True
        try:
            await self._rpc("stopProcess", program_name(run.model), True)
        except (OSError, xmlrpc.client.Error) as e:
            if "NOT_RUNNING" not in str(e):
                log.warning("cannot stop %s: %s", run.model.name, e)
        self._unloaded(run, run.closing_reason or "failed")

    def _fail(self, run: Run, reason: str) -> None:
        now = time.monotonic()
        sup = self.cfg.supervision
        run.failures += 1
        run.retry_at = now + min(sup.backoff_initial_s * 2 ** (run.failures - 1), sup.backoff_max_s)
        run.last_error = reason
        log.warning("%s failed to load: %s", run.model.name, reason)
        self._answer(run, {"ok": False, "status": 502, "code": "model_load_failed",
                           "message": f"model {run.model.name!r} failed to load: {reason}",
                           "retry_after": max(1, math.ceil(run.retry_at - now))})
        run.unloads["failed"] = run.unloads.get("failed", 0) + 1
        self._set(run, FAILED)
        self._event(run, "model_unloaded", reason="failed", error=reason)
        run.stopping = True
        self._spawn(self._stop_failed(run))

    async def _stop_failed(self, run: Run) -> None:
        """Make sure a failed load leaves nothing running (llama-server may hang on after an error)."""
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            await self._rpc("stopProcess", program_name(run.model), True)
        run.stopping = False

    # ---- one tick ----

    async def tick(self, infos: dict[str, dict[str, Any]], health: dict[str, int]) -> None:
        now = time.monotonic()
        names = tuple(self.runs)
        in_flight = hostload.in_flight(self.load_dir, names)
        admitted = hostload.admitted(self.load_dir, names)
        for name, run in self.runs.items():
            run.in_flight = in_flight[name]
            if admitted[name] != run.admitted or run.in_flight:
                run.admitted = admitted[name]
                run.last_use = now
            self._sync(run, infos.get(program_name(run.model), {}), health.get(name), now)
        for run in self.runs.values():
            self._expire_waiters(run, now)
            if run.state == READY and run.model.idle_unload_s and not run.waiters and not run.in_flight \
                    and now - run.last_use >= run.model.idle_unload_s:
                self._close(run, "idle")
            if run.state == CLOSING and not run.stopping and not run.in_flight \
                    and now - run.closing_since >= CLOSE_GRACE_S:
                run.stopping = True
                self._spawn(self._stop(run))
        await self._schedule(now)
        self._write_status()

    def _sync(self, run: Run, info: dict[str, Any], health: int | None, now: float) -> None:
        """Follow the process: a load that is done or failed, an operator's start or stop, a crash."""
        state = info.get("statename", "STOPPED")
        running = state in ("STARTING", "RUNNING")
        if run.stopping:
            return
        if run.state in (UNLOADED, FAILED) and running:
            # Started by an operator (supervisorctl start): it holds memory from now on.
            run.failures = 0
            self._begin_load(run, "operator")
        elif run.state == LOADING:
            if health == 200:
                seconds = now - run.load_started
                run.loads += 1
                run.failures = 0
                run.last_error = ""
                run.load_seconds[next((i for i, b in enumerate(LOAD_BUCKETS) if seconds <= b), len(LOAD_BUCKETS))] += 1
                run.load_seconds_sum += seconds
                run.loaded_at = run.last_use = now
                self._set(run, READY)
                self._event(run, "model_loaded", reason=run.load_reason, load_s=round(seconds, 3))
                log.info("%s loaded in %.2f s", run.model.name, seconds)
                self._answer(run, {"ok": True})
            elif state in ("STOPPED", "STOPPING") and now - run.load_started > 1.0:
                # Stopped by an operator or a reload while loading: no failure; waiting requests load it anew.
                self._unloaded(run, "operator")
            elif not running and now - run.load_started > 1.0:
                why = log_reason(self._log_since(run))
                self._fail(run, why or f"llama-server exited while loading ({state}, exit status "
                                       f"{info.get('exitstatus')})")
        elif run.state in (READY, CLOSING) and not running:
            operator = state in ("STOPPED", "STOPPING")
            self._unloaded(run, "operator" if operator else "failed")
            if not operator:
                run.last_error = log_reason(self._log_since(run)) or "llama-server exited"

    def _close(self, run: Run, reason: str) -> None:
        run.closing_reason = reason
        run.closing_since = time.monotonic()
        self._set(run, CLOSING)
        log.info("closing %s (%s)", run.model.name, reason)

    def _expire_waiters(self, run: Run, now: float) -> None:
        timeout = self.cfg.server.load_timeout_s
        expired = [w for w in run.waiters if now - w.since >= timeout]
        if not expired:
            return
        if run.state == LOADING:
            message = f"model {run.model.name!r} is still loading after {timeout:g} s (server.load_timeout_s)"
        else:
            message = (f"model {run.model.name!r} could not be loaded within {timeout:g} s (server.load_timeout_s): "
                       f"{self._holders(run)}")
        for w in expired:
            run.waiters.remove(w)
            if not w.future.done():
                w.future.set_result({"ok": False, "status": 503, "code": "model_not_ready", "message": message,
                                     "retry_after": 5})
        if not run.waiters and run.model.name in self.queue and run.state != LOADING:
            self.queue.remove(run.model.name)

    def _holders(self, run: Run) -> str:
        """What holds the memory ``run`` needs, for the message of a request that waited too long."""
        used = self.used()
        short = [d for d, mib in run.need.items() if d in self.budget and used.get(d, 0) + mib > self.budget[d]]
        if not short:
            return "other models were ahead of it"
        holders = []
        for name, other in self.runs.items():
            need = other.need
            if other.state in (LOADING, READY, CLOSING) and any(d in need for d in short):
                busy = f"{other.in_flight} in flight" if other.in_flight else "idle"
                holders.append(f"{name} ({', '.join(f'{d} {need[d]} MiB' for d in short if d in need)}, {busy})")
        fixed = ", ".join(f"{d} {self.fixed[d]} MiB" for d in short if self.fixed.get(d))
        if fixed:
            holders.append(f"the always-loaded models ({fixed})")
        return (f"{', '.join(f'{d} ({self.budget[d]} MiB)' for d in short)} is held by " + "; ".join(holders)
                + f"; it needs {', '.join(f'{d} {run.need[d]} MiB' for d in short)}")

    async def _schedule(self, now: float) -> None:
        """Load the first waiting model as soon as it fits, closing others to make room."""
        while self.queue:
            head = self.runs[self.queue[0]]
            if head.state == READY:
                self._answer(head, {"ok": True})
                continue
            if head.state == FAILED and now < head.retry_at:
                self._answer(head, self._failed_answer(head, now))
                continue
            if not head.waiters and head.state != LOADING:
                self.queue.pop(0)
                continue
            break
        else:
            return
        if head.state in (LOADING, CLOSING) or head.stopping:
            return
        used = self.used()
        if plan.fits(head.need, used, self.budget):
            await self._start(head)
            return
        # Room is made only on devices short for the head; victims: idle ones first, then least recently used.
        short = {d for d, mib in head.need.items() if d in self.budget and used.get(d, 0) + mib > self.budget[d]}
        closing = [r for r in self.runs.values() if r.state == CLOSING]
        for r in closing:
            plan.add(used, r.need, -1)
        candidates = sorted(
            (r for r in self.runs.values() if r.state == READY and not r.waiters and short & set(r.need)
             and self._evictable(r, now)),
            key=lambda r: (bool(r.in_flight), r.last_use))
        victims: list[Run] = []
        for r in candidates:
            if plan.fits(head.need, used, self.budget):
                break
            victims.append(r)
            plan.add(used, r.need, -1)
        if victims and plan.fits(head.need, used, self.budget):
            for r in victims:
                self._close(r, "evicted")

    def _evictable(self, run: Run, now: float) -> bool:
        """Past its residency, or idle within it (nothing in flight, nothing admitted for IDLE_S)."""
        if now - run.loaded_at >= self.cfg.server.min_residency_s:
            return True
        return not run.in_flight and now - run.last_use >= IDLE_S

    def _write_status(self) -> None:
        now = time.monotonic()
        doc = {
            "pid": os.getpid(),
            "budget": self.budget,
            "used": self.used(),
            "models": {name: {
                "state": modelstate.NAMES[r.state], "since": round(r.since, 3), "waiting": len(r.waiters),
                "loads": r.loads, "unloads": r.unloads, "load_seconds_buckets": r.load_seconds,
                "load_seconds_sum": round(r.load_seconds_sum, 3), "last_error": r.last_error,
                "retry_in_s": round(max(0.0, r.retry_at - now), 1) if r.state == FAILED else 0,
                "memory_mib": r.need,
            } for name, r in self.runs.items()},
        }
        text = json.dumps(doc, sort_keys=True)
        if text == self._status:
            return
        self._status = text
        path = modelstate.status_file(self.cfg)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(text)
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)

    # ---- the loop ----

    async def _observe(self) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        try:
            infos = {i["name"]: i for i in await asyncio.to_thread(supervisor_rpc.all_process_info, self.rpc_socket)}
        except (OSError, xmlrpc.client.Error) as e:
            log.debug("supervisord not reachable: %s", e)
            infos = {}
        loading = [r for r in self.runs.values() if r.state == LOADING]
        codes = await asyncio.gather(*(_health(r.model.port) for r in loading))
        return infos, {r.model.name: c for r, c in zip(loading, codes, strict=True) if c is not None}

    async def adopt(self) -> None:
        """At start: models already running (the manager restarted under a running supervisord) are loaded."""
        infos, _ = await self._observe()
        for run in self.runs.values():
            state = infos.get(program_name(run.model), {}).get("statename")
            if state in ("STARTING", "RUNNING"):
                self._begin_load(run, "operator")
            else:
                self._set(run, UNLOADED)

    async def run(self) -> None:
        path = socket_path(self.cfg.supervision.runtime_dir)
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self.serve, path=str(path))
        os.chmod(path, 0o600)
        await self.adopt()
        log.info("managing %s; budgets: %s", ", ".join(self.runs) or "no model",
                 ", ".join(f"{d} {mib} MiB" for d, mib in self.budget.items()) or "none")
        async with server:
            while True:
                infos, health = await self._observe()
                await self.tick(infos, health)
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), TICK_S)


async def _health(port: int) -> int | None:
    """The status of a child's /health, or None when it does not answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 1.0)
        parts = line.split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="the appliance's model manager (run by supervisord)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    cfg = load(args.config, check_files=False)
    manager = Manager(cfg, plan.footprints(cfg))
    asyncio.run(manager.run())


if __name__ == "__main__":
    main()
