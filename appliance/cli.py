"""The ``appliance`` command. Exit codes: 0 success, 1 the command failed (bad config, build error), 2 usage error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from appliance.config import DEFAULT_PATH, ApplianceConfig, ConfigError, config_warnings, load
from appliance.lifecycle import plan
from appliance.lifecycle.plan import Footprint
from appliance.usage.command import parse_by, parse_since


def _print_problems(path: Path, e: ConfigError) -> None:
    print(f"{path}: {len(e.problems)} problem(s):", file=sys.stderr)
    for p in e.problems:
        print(f"  {p}", file=sys.stderr)


def print_warnings(cfg: ApplianceConfig, prefix: str = "") -> None:
    """Risks of a valid config, one ``warning:`` line each on stderr; they never change the exit status."""
    for warning in config_warnings(cfg):
        print(f"{prefix}warning: {warning}", file=sys.stderr, flush=True)


def load_planned(path: Path) -> tuple[ApplianceConfig, dict[str, Footprint]]:
    """The config and every model's memory footprint; ConfigError also for a memory plan that cannot work."""
    cfg = load(path)
    return cfg, plan.checked(cfg)


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg, fps = load_planned(args.path)
    except ConfigError as e:
        _print_problems(args.path, e)
        return 1
    print_warnings(cfg)
    models = ", ".join(f"{m.name} ({m.kind}, :{m.port})" for m in cfg.models)
    binds = ", ".join(cfg.server.bind)
    scheme = "https" if cfg.server.tls_cert_file else "http"
    print(f"{args.path}: OK: proxy ({scheme}) on {binds} port {cfg.server.port}, "
          f"metrics on 127.0.0.1:{cfg.metrics.port}, models: {models}")
    for line in plan.describe(cfg, fps):
        print(line)
    return 0


def _install_llama_server(args: argparse.Namespace) -> int:
    from appliance.runtime.build import BuildError, BuildSpec, install

    try:
        path = install(BuildSpec(args.backend, tuple(args.cmake_flag)), Path(args.prefix), args.jobs)
    except BuildError as e:
        print(f"install-llama-server: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _install_model(args: argparse.Namespace) -> int:
    from appliance.runtime.model_install import ModelInstallError, install_default_model

    try:
        path = install_default_model(Path(args.models_dir))
    except ModelInstallError as e:
        print(f"install-model: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _run_model(args: argparse.Namespace) -> int:
    from appliance.runtime.launcher import LaunchError, exec_model

    try:
        exec_model(load(args.config), args.name)
    except (ConfigError, LaunchError) as e:
        print(f"run-model {args.name}: {e}", file=sys.stderr)
        return 1
    return 0  # not reached: exec_model replaces this process


def _supervisor_conf(args: argparse.Namespace) -> int:
    from appliance.runtime.supervisor_conf import write_supervisor_conf

    try:
        path = write_supervisor_conf(load(args.config), Path(args.output) if args.output else None)
    except ConfigError as e:
        _print_problems(args.config, e)
        return 1
    print(path)
    return 0


def _reload(args: argparse.Namespace) -> int:
    from appliance.runtime.reload import ReloadError, reload

    try:
        cfg, _ = load_planned(args.config)
    except ConfigError as e:
        _print_problems(args.config, e)
        print("reload: nothing changed; the running config stays in force", file=sys.stderr)
        return 1
    print_warnings(cfg, "reload: ")
    try:
        report = reload(cfg, lambda line: print(f"reload: {line}", flush=True))
    except ReloadError as e:
        print(f"reload: {e}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(f"reload: {line}")
    if report.failure:
        print(f"reload: {report.failure}", file=sys.stderr)
        return 1
    return 0


def _up(args: argparse.Namespace) -> int:
    from appliance.runtime.up import run_up

    try:
        cfg, _ = load_planned(args.config)
    except ConfigError as e:
        _print_problems(args.config, e)
        return 1
    return run_up(cfg)


def _status(args: argparse.Namespace) -> int:
    from appliance.status.command import run_status

    try:
        cfg = load(args.config)
    except ConfigError as e:
        _print_problems(args.config, e)
        return 1
    return run_status(cfg, args.watch, args.json)


def _usage(args: argparse.Namespace) -> int:
    from appliance.usage.command import run_usage

    try:
        # Only state_dir is needed: a report still works on a host whose binary or a model file is missing.
        cfg = load(args.config, check_files=False)
    except ConfigError as e:
        _print_problems(args.config, e)
        return 1
    return run_usage(cfg, args.since, args.by, args.format)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Managed LLM runtime appliance.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('appliance')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a config file; prints every problem with its key")
    p.add_argument("path", type=Path, help="the appliance TOML file")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("install-llama-server", help="build the pinned llama-server (cached per machine) and install it")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "rocm", "vulkan"])
    p.add_argument("--prefix", default="/opt/appliance/bin", help="directory to install into [%(default)s]")
    p.add_argument("--cmake-flag", action="append", default=[], metavar="-DNAME=VALUE",
                   help="extra CMake flag (repeatable; part of the cache key)")
    p.add_argument("--jobs", type=int, default=None, help="parallel build jobs [all cores]")
    p.set_defaults(func=_install_llama_server)

    p = sub.add_parser("install-model", help="install the default model (Gemma 3 270M Q4_K_M), sha256-checked")
    p.add_argument("--models-dir", default="/opt/appliance/models", help="[%(default)s]")
    p.set_defaults(func=_install_model)

    p = sub.add_parser("run-model", help="exec one model's llama-server (what supervisord runs)")
    p.add_argument("name", help="the model's name in the config")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help="[%(default)s]")
    p.set_defaults(func=_run_model)

    p = sub.add_parser("supervisor-conf", help="write the supervisord config generated from the appliance config")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help="[%(default)s]")
    p.add_argument("--output", help="where to write it [<runtime_dir>/supervisord.conf]")
    p.set_defaults(func=_supervisor_conf)

    p = sub.add_parser("reload", help="validate the config, then apply only what changed to the running appliance",
                       description="Validates the config (an invalid one changes nothing), regenerates the supervisord "
                       "config and applies the difference: added models start, removed ones stop, changed ones "
                       "restart, unchanged ones keep running; the proxy replaces its workers without refusing "
                       "connections.")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help="[%(default)s]")
    p.set_defaults(func=_reload)

    p = sub.add_parser("up", help="run everything in the foreground under supervisord; Ctrl-C stops, SIGHUP reloads")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help="[%(default)s]")
    p.set_defaults(func=_up)

    p = sub.add_parser("status", help="one screen of this host: every model, the helper programs, the health",
                       description="Per model: state (as /health names it), since, restarts, PID, busy/total slots, "
                       "requests waiting, tokens/s, memory per device and the last error; then the proxy, exporter, "
                       "event listener and model manager as supervisord reports them. Reads supervisord's socket and "
                       "the loopback endpoints only: run it on the host, as the service user or a member of its "
                       "group. Exit status: 0 healthy, 1 not healthy or not running (the reasons are printed), "
                       "2 usage.")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help="[%(default)s]")
    p.add_argument("--watch", action="store_true", help="redraw every 2 s until Ctrl-C (tokens/s then covers the "
                   "last minute; a single run measures it over 1 s)")
    p.add_argument("--json", action="store_true", help="one JSON document (with --watch: one per line)")
    p.set_defaults(func=_status)

    p = sub.add_parser("usage", help="requests and tokens per client, model and day, from the usage ledger",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Reads the usage ledger (<supervision.state_dir>/usage.sqlite3): every proxy\n"
                       "worker adds to it, about once a second, the requests it forwarded to a model and\n"
                       "their prompt and completion tokens as llama-server counted them, per UTC hour,\n"
                       "client (the API key's name) and model. Read-only: run it on the host as the\n"
                       "service user or a member of its group. Exit status: 0 (also when nothing was\n"
                       "recorded yet), 1 unreadable config or ledger, 2 usage.",
                       epilog="example: tokens per client and UTC day over the last 30 days, as CSV:\n"
                       "  appliance usage --config /etc/appliance/appliance.toml --since 30d --by client,day "
                       "--format csv")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help="[%(default)s]")
    p.add_argument("--since", type=parse_since, default="7d", metavar="WHEN",
                   help="from when: 30m, 12h, 7d, 2w before now, or an ISO date or date and time in UTC "
                   "(2026-12-01, 2026-12-01T09:00); rounded down to the hour, the ledger's unit [%(default)s]")
    p.add_argument("--by", type=parse_by, default="client,model,day", metavar="FIELDS",
                   help="one row per combination of these, comma-separated: client, model, day, hour (UTC) "
                   "[%(default)s]")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="table: rich on a terminal, aligned columns when piped, with a TOTAL line; csv: a header line "
                   "and the rows; json: a list of objects [%(default)s]")
    p.set_defaults(func=_usage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
