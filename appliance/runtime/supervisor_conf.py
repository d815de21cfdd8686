"""Generate the supervisord config from the appliance config (the TOML file stays the single source of truth).

Each model, the exporter and the event listener carry a fingerprint of everything they read (their settings, and for a
model the identity of its llama-server binary and model file) in their program section. supervisord's own
``reloadConfig`` then sees exactly which programs changed, which is what ``appliance reload`` acts on. The proxy's
section deliberately holds no settings: its workers re-read the config when gunicorn is sent SIGHUP, so a change of
``[server]`` never has to stop the listening socket. Its fingerprint is kept next to the generated config instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig, ModelConfig
from appliance.runtime.names import EVENTS_PROGRAM, EXPORTER_PROGRAM, LIFECYCLE_PROGRAM, PROXY_PROGRAM, program_name

# By file name, not `python:appliance.gunicorn_conf`: gunicorn re-executes a config file on SIGHUP, whereas a module
# stays cached in sys.modules and new workers would keep the old settings.
GUNICORN_CONF = str(Path(__file__).resolve().parent.parent / "gunicorn_conf.py")


def runtime_paths(cfg: ApplianceConfig) -> dict[str, Path]:
    rt = Path(cfg.supervision.runtime_dir)
    return {
        "dir": rt,
        "conf": rt / "supervisord.conf",
        "socket": rt / "supervisor.sock",
        "pid": rt / "supervisord.pid",
        "logs": cfg.log_dir,
        "events": rt / "events.jsonl",
        "proxy_fingerprint": rt / "proxy.fingerprint",
    }


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_identity(path: str) -> list[int] | None:
    """Size and modification time: a replaced binary or model file (a new inode, a new mtime) restarts its model."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def model_fingerprint(cfg: ApplianceConfig, m: ModelConfig) -> str:
    files = [_file_identity(cfg.llama_server.binary), _file_identity(m.file)]
    if m.mmproj:
        files.append(_file_identity(m.mmproj))
    if m.chat_template.endswith(".jinja"):
        # llama-server reads a template file once, at start: one edited in place restarts the model.
        files.append(_file_identity(m.chat_template))
    sup = cfg.supervision
    return _digest(dataclasses.asdict(m), dataclasses.asdict(cfg.llama_server), files,
                   [sup.backoff_initial_s, sup.backoff_max_s, sup.runtime_dir])


def _models_seen_by_others(cfg: ApplianceConfig) -> list[list[Any]]:
    return [[m.name, m.kind, m.port] for m in cfg.models]


def exporter_fingerprint(cfg: ApplianceConfig) -> str:
    return _digest(version("appliance"), cfg.metrics.port, _models_seen_by_others(cfg), cfg.supervision.runtime_dir)


def lifecycle_fingerprint(cfg: ApplianceConfig) -> str:
    """The manager plans with every model's settings and file (its footprint), the budgets and the timings."""
    server, sup = cfg.server, cfg.supervision
    return _digest(version("appliance"), [model_fingerprint(cfg, m) for m in cfg.models], cfg.memory,
                   server.load_timeout_s, server.min_residency_s, sup.backoff_initial_s, sup.backoff_max_s,
                   dataclasses.asdict(cfg.events), str(cfg.log_dir))


def events_fingerprint(cfg: ApplianceConfig) -> str:
    return _digest(version("appliance"), dataclasses.asdict(cfg.events), _models_seen_by_others(cfg),
                   cfg.supervision.runtime_dir, str(cfg.log_dir))


def _file_digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def proxy_fingerprint(cfg: ApplianceConfig) -> str:
    """Everything the proxy workers read, the API keys and the TLS certificate and key included: a change means new
    workers (gunicorn SIGHUP), which load the files anew, so a certificate rotated in place is served after a reload."""
    server = cfg.server
    files = (server.api_keys_file, cfg.events.token_file, server.tls_cert_file, server.tls_key_file)
    secrets = [_file_digest(f) for f in files if f]
    return _digest(dataclasses.asdict(dataclasses.replace(cfg, source=None)), secrets)


def _arg(value: str) -> str:
    """One argument in a supervisord ``command=`` line: shell-quoted (it is split like a shell line) and with '%'
    doubled (supervisord expands %(name)s in its config)."""
    return shlex.quote(value).replace("%", "%%")


def _log_settings(logs: Path, name: str) -> str:
    return (f"redirect_stderr=true\nstdout_logfile={logs / name}.log\n"
            "stdout_logfile_maxbytes=10MB\nstdout_logfile_backups=3\n")


def render(cfg: ApplianceConfig) -> str:
    if cfg.source is None:
        raise ValueError("the config must have been loaded from a file")
    p = runtime_paths(cfg)
    py = _arg(sys.executable)
    config = _arg(str(cfg.source))
    sup = cfg.supervision
    # The socket is the service user's and its group's (supervisord leaves it owned by the user and primary group
    # it runs as): members of that group run `appliance status` and `appliancectl` without root. Group members can
    # thereby also stop and start programs: membership is for operators only. The runtime dir stays 0750.
    parts = [f"""; Generated by `appliance supervisor-conf` from {cfg.source}; edit that file, not this one.
[unix_http_server]
file={p["socket"]}
chmod=0770

[supervisord]
logfile={p["logs"] / "supervisord.log"}
logfile_maxbytes=10MB
pidfile={p["pid"]}
childlogdir={p["logs"]}
nodaemon=true
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{p["socket"]}
"""]
    for m in cfg.models:
        name = program_name(m)
        # always: a run shorter than stable_uptime_s (startsecs) is a failed start; startretries of them in a row ->
        # FATAL. on_demand: the model manager starts and stops it, and decides what a failed load means, so
        # supervisord neither starts it nor restarts it.
        # The launcher execs llama-server, so TERM reaches it directly; the group kill is a safety net.
        starts = ("autostart=false\nautorestart=false\nstartsecs=0\nstartretries=0" if m.on_demand else
                  f"autostart=true\nautorestart=true\nstartsecs={sup.stable_uptime_s}\nstartretries={sup.max_restarts}")
        parts.append(f"""[program:{name}]
command={py} -m appliance run-model {_arg(m.name)} --config {config}
environment=APPLIANCE_FINGERPRINT="{model_fingerprint(cfg, m)}"
{starts}
stopsignal=TERM
stopwaitsecs=20
stopasgroup=true
killasgroup=true
priority=100
{_log_settings(p["logs"], name)}""")
    # stopwaitsecs must exceed gunicorn's graceful_timeout (graceful_timeout_s + 5) or streams get cut by SIGKILL.
    stopwait = int(cfg.server.graceful_timeout_s) + 15
    parts.append(f"""[program:{PROXY_PROGRAM}]
command={py} -m gunicorn -c {_arg(GUNICORN_CONF)}
environment=APPLIANCE_CONFIG={config},APPLIANCE_VERSION="{version("appliance")}"
autostart=true
autorestart=true
startsecs=2
stopsignal=TERM
stopwaitsecs={stopwait}
stopasgroup=true
killasgroup=true
priority=200
{_log_settings(p["logs"], PROXY_PROGRAM)}""")
    # The model manager starts before the proxy (its workers ask it for loads) and stops after it.
    helpers = [(EXPORTER_PROGRAM, "appliance.metrics.exporter", exporter_fingerprint(cfg), 300)]
    if any(m.on_demand for m in cfg.models):
        helpers.insert(0, (LIFECYCLE_PROGRAM, "appliance.lifecycle.manager", lifecycle_fingerprint(cfg), 150))
    for name, module, fingerprint, priority in helpers:
        parts.append(f"""[program:{name}]
command={py} -m {module} --config {config}
environment=APPLIANCE_FINGERPRINT="{fingerprint}"
autostart=true
autorestart=true
startsecs=1
stopsignal=TERM
stopwaitsecs=10
priority={priority}
{_log_settings(p["logs"], name)}""")
    parts.append(f"""[eventlistener:{EVENTS_PROGRAM}]
command={py} -m appliance.events.listener --config {config}
environment=APPLIANCE_FINGERPRINT="{events_fingerprint(cfg)}"
events=PROCESS_STATE
autostart=true
autorestart=true
buffer_size=1000
priority=50
stderr_logfile={p["logs"] / EVENTS_PROGRAM}.log
""")
    return "\n".join(parts)


def write_supervisor_conf(cfg: ApplianceConfig, output: Path | None = None) -> Path:
    p = runtime_paths(cfg)
    p["logs"].mkdir(parents=True, exist_ok=True)
    os.chmod(p["dir"], 0o750)
    target = output or p["conf"]
    _write_atomically(target, render(cfg))
    if output is None:
        _write_atomically(p["proxy_fingerprint"], proxy_fingerprint(cfg) + "\n")
    return target


def _write_atomically(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)
