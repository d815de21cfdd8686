"""``appliance up``: supervisord in the foreground with the generated config; reports progress as models get ready."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from appliance.config import ApplianceConfig, ConfigError, config_warnings, load
from appliance.lifecycle import plan
from appliance.runtime.reload import ReloadError, reload
from appliance.runtime.supervisor_conf import write_supervisor_conf


def _say(message: str) -> None:
    print(f"[appliance] {message}", flush=True)


# Progress comes from the proxy's own /health on this host, which carries no secret: the certificate is not verified,
# since it is made out for the names clients use and signed by a CA this host need not trust.
_PROBE_TLS = ssl.create_default_context()
_PROBE_TLS.check_hostname = False
_PROBE_TLS.verify_mode = ssl.CERT_NONE


def _health(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=2, context=_PROBE_TLS) as r:
            doc: dict[str, object] = json.load(r)
            return doc
    except urllib.error.HTTPError as e:  # 503 while loading still carries the document
        try:
            doc = json.load(e)
            return doc
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def busy_ports(cfg: ApplianceConfig) -> list[str]:
    """Ports of the config that something else already listens on: supervisord would only report them as FATAL."""
    wanted = [(f"server.port ({addr})", addr, cfg.server.port) for addr in cfg.server.bind]
    wanted.append(("metrics.port", "127.0.0.1", cfg.metrics.port))
    wanted += [(f"port of model {m.name}", "127.0.0.1", m.port) for m in cfg.models]
    busy = []
    for key, addr, port in wanted:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
            except OSError as e:
                busy.append(f"{key}: cannot listen on {addr}:{port}: {e.strerror}")
    return busy


def _reload(cfg: ApplianceConfig) -> None:
    assert cfg.source is not None
    _say(f"SIGHUP: reloading {cfg.source}")
    try:
        new = load(cfg.source)
        plan.checked(new)
        report = reload(new, lambda line: _say(f"reload: {line}"))
    except ConfigError as e:
        for problem in e.problems:
            _say(f"  {problem}")
        _say("the config is invalid: nothing changed")
        return
    except ReloadError as e:
        _say(f"reload failed: {e}")
        return
    for line in report.lines():
        _say(f"reload: {line}")
    if report.failure:
        _say(f"reload failed: {report.failure}")


def run_up(cfg: ApplianceConfig) -> int:
    for warning in config_warnings(cfg):
        print(f"[appliance] warning: {warning}", file=sys.stderr, flush=True)
    busy = busy_ports(cfg)
    if busy:
        for line in busy:
            print(f"[appliance] {line}", file=sys.stderr)
        print("[appliance] stop what uses them (another `appliance up`?) or change the ports in the config",
              file=sys.stderr)
        return 1
    conf = write_supervisor_conf(cfg)
    supervisord = Path(sys.executable).with_name("supervisord")
    _say(f"supervisord config: {conf}")
    # Its own process group: a terminal's Ctrl-C or hangup must not reach supervisord directly (a SIGHUP would make it
    # restart every program); this process turns them into a clean stop or a reload.
    proc = subprocess.Popen([str(supervisord), "-n", "-c", str(conf)], process_group=0)

    stopping = False
    reload_wanted = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            _say("stopping (waiting for streams to finish and every model to stop)")
            proc.send_signal(signal.SIGTERM)

    def hup(signum: int, frame: FrameType | None) -> None:
        nonlocal reload_wanted
        reload_wanted = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, hup)
    host = cfg.server.bind[0]
    scheme = "https" if cfg.server.tls_cert_file else "http"
    base = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{cfg.server.port}"
    _say(f"OpenAI API: {base}/v1  health: {base}/health  "
         f"supervisorctl -c {conf} status")
    seen: dict[str, str] = {}
    announced = False
    while proc.poll() is None:
        if reload_wanted and not stopping:
            reload_wanted = False
            _reload(cfg)
        doc = _health(base + "/health")
        models = doc.get("models") if doc else None
        if isinstance(models, dict):
            for name, info in models.items():
                state = info.get("state") if isinstance(info, dict) else None
                if isinstance(state, str) and seen.get(name) != state:
                    seen[name] = state
                    _say(f"model {name}: {state}")
            if doc and doc.get("status") == "ok" and not announced:
                announced = True
                _say(f"ready: every model serves at {base}/v1 (Ctrl-C stops everything)")
            elif doc and doc.get("status") != "ok":
                announced = False
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    _say(f"supervisord exited with status {proc.returncode}")
    return 0 if proc.returncode in (0, -signal.SIGTERM) else 1
