"""gunicorn settings for the proxy, derived from the appliance config named by $APPLIANCE_CONFIG.

Checked with ``gunicorn --check-config -c python:appliance.gunicorn_conf``.
"""

from __future__ import annotations

import ipaddress
import os

from appliance.config import load

_cfg = load(os.environ["APPLIANCE_CONFIG"], check_files=False)


def _bind(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if isinstance(ipaddress.ip_address(addr), ipaddress.IPv6Address) else f"{addr}:{port}"


wsgi_app = "appliance.proxy.app:from_env()"
bind = [_bind(a, _cfg.server.port) for a in _cfg.server.bind]
workers = _cfg.server.workers
worker_class = "appliance.proxy.worker.ApplianceWorker"
# The worker drains for graceful_timeout_s; gunicorn's own deadline (SIGKILL after it) leaves 5 s on top.
graceful_timeout = int(_cfg.server.graceful_timeout_s) + 5
timeout = 30
keepalive = 5
proc_name = "appliance-proxy"
accesslog = None
errorlog = "-"
loglevel = "info"
