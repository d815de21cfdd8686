"""gunicorn settings for the proxy, derived from the appliance config named by $APPLIANCE_CONFIG.

gunicorn runs this file by name (``gunicorn -c .../appliance/gunicorn_conf.py``), at start and again on every SIGHUP,
so a reload picks up changed settings. It is loaded by the arbiter before any worker imports the app, which makes it
the place to point prometheus-client at its multiprocess directory.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from typing import Any

from appliance.config import load
from appliance.metrics import MULTIPROC_ENV, multiproc_dir
from appliance.policy import clients_dir, concurrency_dir, windows
from appliance.proxy import retire
from appliance.shared import admission, hostload

_cfg = load(os.environ["APPLIANCE_CONFIG"], check_files=False)
# Must be set before prometheus_client is first imported (it reads the variable at import time).
os.environ[MULTIPROC_ENV] = str(multiproc_dir(_cfg))


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
# gunicorn's control socket (gunicornc: add or kill workers, reload) would be a second way to manage the proxy, beside
# supervisorctl and `appliance reload`, and by default it lands in the service user's home: keep it off.
control_socket_disable = True
# HTTPS when both are set (validated together by the config). uvicorn-worker hands them to uvicorn, which loads them
# when each worker boots: a SIGHUP (`appliance reload`) makes new workers that read a certificate rotated in place.
# Python's SSLContext defaults give TLS 1.2 and 1.3 only, with forward-secret AEAD ciphers (OpenSSL security level 2).
certfile = _cfg.server.tls_cert_file or None
keyfile = _cfg.server.tls_key_file or None
accesslog = None
errorlog = "-"
loglevel = "info"


def on_starting(server: Any) -> None:
    """Stale files from a previous run would be summed into this run's metrics: start empty."""
    path = multiproc_dir(_cfg)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    hostload.reset(hostload.load_dir(_cfg))
    hostload.reset(concurrency_dir(_cfg))
    windows.reset(clients_dir(_cfg))
    admission.reset(admission.admission_dir(_cfg))


def on_reload(server: Any) -> None:
    """SIGHUP: the running workers are about to be replaced; they must retire, not drain (see proxy/retire.py)."""
    retire.mark(retire.retiring_file(_cfg), server.WORKERS)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (in-flight), its share of the host's load and of its clients' concurrency, and
    its places in the admission queues; its counters stay so that totals never go backwards."""
    from prometheus_client import multiprocess

    slot = hostload.release_dead(hostload.load_dir(_cfg), worker.pid)
    client_slot = hostload.release_dead(concurrency_dir(_cfg), worker.pid)
    if client_slot >= 0:
        windows.release_dead(clients_dir(_cfg), client_slot)
    if slot >= 0:  # the same worker slot in the admission queues: its waiters and slots go to the others
        admission.release_dead(admission.admission_dir(_cfg), slot, {m.name: m.parallel for m in _cfg.models})

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
