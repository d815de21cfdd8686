"""About a minute of the soak (tests/e2e/soak.py) against a fresh appliance; longer runs: `python -m tests.e2e.soak`."""

from __future__ import annotations

from pathlib import Path

from appliance.config import load
from tests.e2e.conftest import chat_model, start_appliance
from tests.e2e.soak import Soak
from tests.helpers import free_port


def test_one_minute_of_mixed_traffic_from_16_clients(tmp_path: Path) -> None:
    # parallel 4: its queue bound (parallel + max_queue = 20 by default) admits all 16 clients, so no 429 either.
    app = start_appliance(tmp_path, [{**chat_model(free_port()), "parallel": 4}], {})
    try:
        app.wait_health(200)
        app.wait_running()
        soak = Soak(load(app.config, check_files=False), app.url)
        summary, problems = soak.run(60, warmup_s=15, rss_mb=30, fds=20)
    finally:
        app.stop()
    print(summary)
    assert not problems, "\n".join([summary, *problems[:30]])
