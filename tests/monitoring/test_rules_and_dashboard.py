"""The alerting rules and the Grafana dashboard load in their tools and only use metrics the appliance exports."""

from __future__ import annotations

import json
import re
import subprocess

from appliance.metrics import proxy as proxy_metrics
from tests.helpers import REPO

MONITORING = REPO / "monitoring"
EXPORTER_FAMILIES = {"appliance_model_up", "appliance_model_ready", "appliance_program_up", "appliance_program_state",
                     "appliance_program_start_time_seconds", "appliance_program_restarts", "appliance_in_flight",
                     "appliance_model_loads", "appliance_model_unloads", "appliance_model_load_seconds",
                     "appliance_model_load_waiting", "appliance_model_state", "appliance_memory_budget_bytes",
                     "appliance_memory_used_bytes"}


def exported_names() -> set[str]:
    names = set(EXPORTER_FAMILIES)
    for obj in vars(proxy_metrics).values():
        name = getattr(obj, "_name", None)
        if isinstance(name, str) and name.startswith("appliance_"):
            names.add(name)
    suffixed = set()
    for n in names:
        suffixed |= {n, n + "_total", n + "_bucket", n + "_sum", n + "_count"}
    return suffixed


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bappliance_[a-z_]+", text))


def test_promtool_accepts_the_rules() -> None:
    r = subprocess.run(["promtool", "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 8 rules found" in r.stdout


def test_rules_cover_the_required_alerts() -> None:
    text = (MONITORING / "alerts.yml").read_text()
    for alert in ("ApplianceModelDown", "ApplianceRestartLoop", "ApplianceHighErrorRate", "ApplianceSlowFirstToken",
                  "ApplianceModelLoadFailed"):
        assert f"alert: {alert}" in text


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    text = (MONITORING / "alerts.yml").read_text() + (MONITORING / "grafana-dashboard.json").read_text()
    unknown = referenced(text) - exported_names()
    assert not unknown, unknown


def test_dashboard_structure() -> None:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"] for t in p["targets"])
        assert p["datasource"]["uid"] == "${datasource}"
        assert set(p["gridPos"]) == {"h", "w", "x", "y"}
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "instance"}


