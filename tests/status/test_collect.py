"""Pieces of the collector that need no running appliance."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from appliance.config import ApplianceConfig, ModelConfig, ServerConfig
from appliance.status.collect import _derived_state, _health, health_url


def test_the_health_url_reaches_a_wildcard_bind_on_loopback_and_uses_https_with_tls() -> None:
    cfg = ApplianceConfig(models=(), source=Path("/x.toml"))
    assert health_url(cfg) == "http://127.0.0.1:8080/health"
    for bind, url in (("0.0.0.0", "https://127.0.0.1:8443/health"), ("::", "https://[::1]:8443/health"),
                      ("10.0.0.5", "https://10.0.0.5:8443/health")):
        server = ServerConfig(bind=(bind,), port=8443, tls_cert_file="c.pem", tls_key_file="k.pem")
        assert health_url(dataclasses.replace(cfg, server=server)) == url


def test_without_the_proxy_a_state_is_derived_from_supervisord_and_the_child() -> None:
    always = ModelConfig(name="a", file="a.gguf", port=1)
    on_demand = dataclasses.replace(always, load="on_demand")
    assert _derived_state(always, "FATAL", False, {}) == "failed"
    assert _derived_state(always, "RUNNING", True, {}) == "ready"
    assert _derived_state(always, "RUNNING", False, {}) == "loading"
    assert _derived_state(always, "BACKOFF", False, {}) == "restarting"
    assert _derived_state(always, "", False, {}) == "stopped"
    assert _derived_state(on_demand, "STOPPED", False, {"state": "unloaded"}) == "unloaded"


def test_a_health_answer_is_read_whatever_its_status_code() -> None:
    assert _health(None) == ("unreachable", {})
    assert _health((503, b'{"status": "starting", "models": {}}')) == ("starting", {"status": "starting",
                                                                                    "models": {}})
    assert _health((502, b"<html>bad gateway</html>")) == ("HTTP 502", {})
