"""The ``appliance status`` loop: collect, render, and for ``--watch`` again every 2 s until Ctrl-C."""

from __future__ import annotations

import sys
import time

from appliance.config import ApplianceConfig
from appliance.status import render
from appliance.status.collect import Collector, Snapshot

WATCH_INTERVAL_S = 2.0
#: A one-shot run samples the token counters twice, this far apart, for tokens/s.
ONE_SHOT_SAMPLE_S = 1.0


def _show(snapshot: Snapshot, as_json: bool) -> None:
    print(render.to_json(snapshot) if as_json else render.plain(snapshot), flush=True)


def run_status(cfg: ApplianceConfig, watch: bool = False, as_json: bool = False) -> int:
    """0 when the host is healthy, 1 when not (or nothing runs); each problem is named in the output."""
    collector = Collector(cfg)
    try:
        first = time.time()
        collector.sample_tokens()  # a llama-server that hangs takes its timeout: that counts into the second
        time.sleep(max(0.0, first + ONE_SHOT_SAMPLE_S - time.time()))
        snapshot = collector.collect()
        if not watch:
            if sys.stdout.isatty() and not as_json:
                from rich.console import Console

                Console().print(render.rich_view(snapshot))
            else:
                _show(snapshot, as_json)
            return 0 if snapshot.healthy else 1
        try:
            if sys.stdout.isatty() and not as_json:
                from rich.live import Live

                with Live(render.rich_view(snapshot), auto_refresh=False, screen=False) as live:
                    while True:
                        time.sleep(max(0.0, snapshot.taken_at + WATCH_INTERVAL_S - time.time()))
                        snapshot = collector.collect()
                        live.update(render.rich_view(snapshot), refresh=True)
            while True:
                # Not a terminal: one block (or one JSON line) per interval, nothing redrawn.
                _show(snapshot, as_json)
                if not as_json:
                    print(flush=True)
                time.sleep(max(0.0, snapshot.taken_at + WATCH_INTERVAL_S - time.time()))
                snapshot = collector.collect()
        except KeyboardInterrupt:
            return 0 if snapshot.healthy else 1
    finally:
        collector.close()
