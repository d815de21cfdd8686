"""Readiness states from supervisord's view and llama-server's /health, without processes (fakes for both)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load
from appliance.proxy import readiness
from appliance.proxy.readiness import Readiness
from appliance.shared.modelstate import ModelStates
from tests.helpers import stub_config, write_config


class FakeUpstream:
    def __init__(self) -> None:
        self.status: int | None = 200

    async def health(self, base_url: str, timeout_s: float) -> int | None:
        return self.status


@pytest.mark.parametrize(("statename", "want"), [
    # supervisord shows EXITED between a crash and the restart it then makes (autorestart): not an operator's stop.
    ("EXITED", "restarting"), ("BACKOFF", "restarting"), ("STARTING", "restarting"),
    ("STOPPING", "stopped"), ("STOPPED", "stopped"), ("FATAL", "failed"),
])
def test_a_ready_model_that_goes_down_is_named_after_supervisords_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, statename: str, want: str) -> None:
    doc = stub_config(tmp_path, 9001, 9002)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "supervisor.sock").touch()  # Readiness asks supervisord only when its socket exists
    cfg = load(write_config(tmp_path / "appliance.toml", doc), check_files=False)
    view: dict[str, dict[str, Any]] = {"model-chat-a": {"statename": "RUNNING"}}
    monkeypatch.setattr(readiness, "_supervisor_view", lambda cfg, sock: (view, {}))
    upstream = FakeUpstream()
    r = Readiness(cfg, upstream, ModelStates(tmp_path / "states", ()))  # type: ignore[arg-type]
    asyncio.run(r.poll_once())
    assert r.models["chat-a"].state == "ready"
    upstream.status = None
    view["model-chat-a"] = {"statename": statename}
    asyncio.run(r.poll_once())
    assert r.models["chat-a"].state == want
