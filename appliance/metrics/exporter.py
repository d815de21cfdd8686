"""The loopback-only Prometheus exporter: one scrape target for the whole host (SPEC §5).

``GET /metrics`` merges, per scrape: the proxy's multiprocess metrics; every llama-server's own ``/metrics`` with a
``model`` label added (fetched concurrently with a short timeout; a child that is down gives
``appliance_model_up{model} 0`` rather than a failed scrape); and supervisord's facts per program. The bind address is
not configurable: it is 127.0.0.1, always.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import time
import xmlrpc.client
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from appliance.config import ApplianceConfig, load
from appliance.metrics import MULTIPROC_ENV, multiproc_dir, read_lifecycle_dropped, read_restarts
from appliance.runtime.names import program_name
from appliance.runtime.supervisor_rpc import all_process_info
from appliance.shared import admission, hostload, modelstate
from appliance.shared.modelstate import LOAD_BUCKETS, UNLOAD_REASONS

log = logging.getLogger("appliance.exporter")
BIND = "127.0.0.1"
MiB = 1024 * 1024
CHILD_TIMEOUT_S = 2.0
STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN")


class Exporter:
    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.session: aiohttp.ClientSession | None = None

    async def _get(self, url: str) -> tuple[int, str] | None:
        assert self.session is not None
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=CHILD_TIMEOUT_S)) as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _supervisor(self) -> list[dict[str, Any]]:
        sock = Path(self.cfg.supervision.runtime_dir) / "supervisor.sock"
        try:
            return await asyncio.to_thread(all_process_info, sock)
        except (OSError, xmlrpc.client.Error) as e:
            log.debug("supervisord not reachable: %s", e)
            return []

    async def scrape(self) -> bytes:
        # prometheus_client is imported here, after main() has set its multiprocess directory.
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        models = self.cfg.models
        child_metrics, child_health, infos = await asyncio.gather(
            asyncio.gather(*(self._get(f"http://127.0.0.1:{m.port}/metrics") for m in models)),
            asyncio.gather(*(self._get(f"http://127.0.0.1:{m.port}/health") for m in models)),
            self._supervisor(),
        )
        registry = CollectorRegistry()
        proxy = MultiProcessCollector(None, path=str(multiproc_dir(self.cfg)))  # type: ignore[no-untyped-call]
        proxy_families = proxy.collect()  # type: ignore[no-untyped-call]
        registry.register(_Static(list(_with_lifecycle_drops(proxy_families, read_lifecycle_dropped(self.cfg)))))
        registry.register(_Static(list(self._families(child_metrics, child_health, infos))))
        return generate_latest(registry)

    def _families(self, child_metrics: list[tuple[int, str] | None], child_health: list[tuple[int, str] | None],
                  infos: list[dict[str, Any]]) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        up = GaugeMetricFamily("appliance_model_up", "1 when the model's llama-server answered /metrics.",
                               labels=["model"])
        ready = GaugeMetricFamily("appliance_model_ready", "1 when the model's llama-server /health is 200.",
                                  labels=["model"])
        merged: dict[str, Metric] = {}
        for m, got, health in zip(self.cfg.models, child_metrics, child_health, strict=True):
            ok = got is not None and got[0] == 200
            up.add_metric([m.name], 1.0 if ok else 0.0)
            ready.add_metric([m.name], 1.0 if health is not None and health[0] == 200 else 0.0)
            if not ok or got is None:
                continue
            try:
                families = list(text_string_to_metric_families(got[1]))
            except ValueError as e:
                log.warning("unparsable /metrics from %s: %s", m.name, e)
                continue
            for fam in families:
                target = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                for s in fam.samples:
                    target.add_sample(s.name, {**s.labels, "model": m.name}, s.value, s.timestamp, s.exemplar)
        yield up
        yield ready
        in_flight = GaugeMetricFamily("appliance_in_flight", "Requests being forwarded now, summed over the proxy's "
                                      "workers.", labels=["model"])
        for name, n in hostload.in_flight(hostload.load_dir(self.cfg), (m.name for m in self.cfg.models)).items():
            in_flight.add_metric([name], float(n))
        yield in_flight
        queued = GaugeMetricFamily("appliance_queue_waiting", "Requests waiting in the proxy for one of the model's "
                                   "slots (every slot busy), summed over the workers.", labels=["model"])
        for name, n in admission.waiting(admission.admission_dir(self.cfg), (m.name for m in self.cfg.models)).items():
            queued.add_metric([name], float(n))
        yield queued
        yield from merged.values()
        yield from lifecycle_families(self.cfg)

        restarts = read_restarts(self.cfg)
        p_up = GaugeMetricFamily("appliance_program_up", "1 when supervisord reports the program RUNNING.",
                                 labels=["program", "model"])
        p_state = GaugeMetricFamily("appliance_program_state", "supervisord state of each program (1 = current).",
                                    labels=["program", "model", "state"])
        p_start = GaugeMetricFamily("appliance_program_start_time_seconds", "Unix time the program last started.",
                                    labels=["program", "model"])
        p_restarts = CounterMetricFamily("appliance_program_restarts", "Restarts seen by the event listener.",
                                         labels=["program", "model"])
        names = {program_name(m): m.name for m in self.cfg.models}
        for info in infos:
            prog = str(info["name"])
            labels = [prog, names.get(prog, "")]
            p_up.add_metric(labels, 1.0 if info["statename"] == "RUNNING" else 0.0)
            for state in STATES:
                p_state.add_metric([*labels, state], 1.0 if info["statename"] == state else 0.0)
            p_start.add_metric(labels, float(info["start"]))
            p_restarts.add_metric(labels, float(restarts.get(prog, 0)))
        yield from (p_up, p_state, p_start, p_restarts)


def lifecycle_families(cfg: ApplianceConfig) -> Iterable[Any]:
    """The model manager's counters (loads, unloads by reason, load seconds, requests waiting) and each device's budget
    and estimated use, from its status file; nothing while no model loads on demand."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    try:
        doc = json.loads(modelstate.status_file(cfg).read_text())
        models: dict[str, Any] = doc["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    loads = CounterMetricFamily("appliance_model_loads", "On-demand model loads that became ready.", labels=["model"])
    unloads = CounterMetricFamily("appliance_model_unloads", "On-demand model unloads by reason (idle, evicted, "
                                  "operator, failed).", labels=["model", "reason"])
    seconds = HistogramMetricFamily("appliance_model_load_seconds", "Time from an on-demand model's start to its "
                                    "/health answering 200.", labels=["model"])
    waiting = GaugeMetricFamily("appliance_model_load_waiting", "Requests waiting for their model to be loaded.",
                                labels=["model"])
    state = GaugeMetricFamily("appliance_model_state", "The model manager's state of each on-demand model "
                              "(1 = current).", labels=["model", "state"])
    for name, m in models.items():
        for known in modelstate.NAMES.values():
            state.add_metric([name, known], 1.0 if m["state"] == known else 0.0)
        loads.add_metric([name], float(m["loads"]))
        for reason in UNLOAD_REASONS:
            unloads.add_metric([name, reason], float(m["unloads"].get(reason, 0)))
        cumulative, buckets = 0, []
        for bound, count in zip((*LOAD_BUCKETS, math.inf), m["load_seconds_buckets"], strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), float(cumulative)))
        seconds.add_metric([name], buckets, float(m["load_seconds_sum"]))
        waiting.add_metric([name], float(m["waiting"]))
    budget = GaugeMetricFamily("appliance_memory_budget_bytes", "Each device's memory budget ([memory]).",
                               labels=["device"])
    used = GaugeMetricFamily("appliance_memory_used_bytes", "Each device's memory held by loaded models, as "
                             "estimated (or set by memory_mib).", labels=["device"])
    for device, mib in doc.get("budget", {}).items():
        budget.add_metric([device], float(mib) * MiB)
    for device, mib in doc.get("used", {}).items():
        used.add_metric([device], float(mib) * MiB)
    yield from (loads, unloads, seconds, waiting, state, budget, used)


def _with_lifecycle_drops(proxy_families: Iterable[Any], dropped: int) -> Iterable[Any]:
    """The proxy workers' families, with the event listener's dropped lifecycle events added to
    ``appliance_events_dropped_total`` as ``sink="lifecycle"``: one family per name, or the exposition is invalid."""
    from prometheus_client.core import CounterMetricFamily

    found = False
    for fam in proxy_families:
        if fam.name == "appliance_events_dropped":
            fam.add_sample("appliance_events_dropped_total", {"sink": "lifecycle"}, float(dropped))
            found = True
        yield fam
    if not found:
        fam = CounterMetricFamily("appliance_events_dropped", "Events dropped (queue full or collector down).",
                                  labels=["sink"])
        fam.add_metric(["lifecycle"], float(dropped))
        yield fam


class _Static:
    """A collector that returns families gathered before the scrape was rendered."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families


def make_app(cfg: ApplianceConfig) -> web.Application:
    exporter = Exporter(cfg)

    async def metrics(request: web.Request) -> web.Response:
        # The 0.0.4 text format: every Prometheus 2.x and 3.x accepts it (generate_latest's default escaping keeps
        # names legacy-valid); prometheus-client's CONTENT_TYPE_LATEST announces 1.0.0, which Prometheus 2 predates.
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

        t0 = time.perf_counter()
        body = await exporter.scrape()
        log.debug("scrape took %.3f s", time.perf_counter() - t0)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def start(app: web.Application) -> None:
        exporter.session = aiohttp.ClientSession()

    async def stop(app: web.Application) -> None:
        if exporter.session is not None:
            await exporter.session.close()

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="the appliance's loopback Prometheus exporter (run by supervisord)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    cfg = load(args.config, check_files=False)
    os.environ[MULTIPROC_ENV] = str(multiproc_dir(cfg))
    multiproc_dir(cfg).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    web.run_app(make_app(cfg), host=BIND, port=cfg.metrics.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
