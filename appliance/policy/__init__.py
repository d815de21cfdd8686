"""Per-client policies (``[clients.<name>]``): model allow-lists, concurrency, request and token windows, budgets.

The shared files' places are here, importable without the request-path modules (the gunicorn arbiter resets and cleans
them before any worker starts).
"""

from __future__ import annotations

from pathlib import Path

from appliance.config import ApplianceConfig


def clients_dir(cfg: ApplianceConfig) -> Path:
    """The clients' windows; they outlive reloads and proxy restarts, not the runtime directory."""
    return Path(cfg.supervision.runtime_dir) / "clients"


def concurrency_dir(cfg: ApplianceConfig) -> Path:
    """Which region of the clients' files each proxy worker writes (its slot), reset with the proxy."""
    return Path(cfg.supervision.runtime_dir) / "clients-inflight"
