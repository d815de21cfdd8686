"""A snapshot as rich tables (a terminal), plain aligned columns (a pipe or a file), or one JSON document."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any

from appliance.status.collect import Memory, ModelStatus, ProgramStatus, Snapshot

if TYPE_CHECKING:
    from rich.console import RenderableType

MODEL_HEADERS = ("MODEL", "STATE", "SINCE", "RESTARTS", "PID", "SLOTS", "WAITING", "TOK/S", "MEMORY", "LAST ERROR")
PROGRAM_HEADERS = ("PROGRAM", "STATE", "PID", "UPTIME", "DETAIL")
_STATE_STYLE = {"ready": "green", "RUNNING": "green", "ok": "green", "unloaded": "dim", "loading": "yellow",
                "unloading": "yellow", "starting": "yellow", "restarting": "yellow", "STARTING": "yellow",
                "BACKOFF": "yellow", "draining": "yellow"}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _memory(mem: tuple[Memory, ...]) -> str:
    # "~": estimated from the GGUF file; "plan": what the model manager reserved for a loaded on-demand model.
    prefix = {"rss": "", "estimate": "~", "reserved": "plan "}
    return ", ".join(f"{m.device} {prefix[m.source]}{m.mib} MiB" for m in mem) or "-"


def _num(value: int | float | None, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def model_row(m: ModelStatus, now: float) -> tuple[str, ...]:
    slots = f"{_num(m.slots_busy)}/{m.slots_total}"
    return (m.name + (" (on demand)" if m.load == "on_demand" else ""), m.state,
            duration(now - m.since) if m.since else "-", str(m.restarts), _num(m.pid), slots, _num(m.waiting),
            _num(m.tokens_per_s, "{:.1f}"), _memory(m.memory), m.last_error or "-")


def program_row(p: ProgramStatus) -> tuple[str, ...]:
    return p.name, p.state, _num(p.pid), duration(p.uptime_s), p.detail


def title(s: Snapshot) -> str:
    window = f"tok/s over {s.tokens_window_s:g}s" if s.tokens_window_s else "tok/s: one sample only"
    return (f"{s.host}  health: {s.health}  ({s.health_url})  {window}  "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(s.taken_at))}")


def _columns(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]]


def plain(s: Snapshot) -> str:
    lines = [title(s), ""]
    lines += _columns(MODEL_HEADERS, [model_row(m, s.taken_at) for m in s.models])
    lines.append("")
    lines += _columns(PROGRAM_HEADERS, [program_row(p) for p in s.programs])
    lines.append("")
    lines.append("healthy" if s.healthy else "NOT HEALTHY:")
    lines += [f"  {p}" for p in s.problems]
    lines += [f"note: {n}" for n in s.notes]
    return "\n".join(lines)


def as_dict(s: Snapshot) -> dict[str, Any]:
    return {**dataclasses.asdict(s), "healthy": s.healthy}


def to_json(s: Snapshot) -> str:
    return json.dumps(as_dict(s))


def rich_view(s: Snapshot) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def styled(value: str) -> Text:
        return Text(value, style=_STATE_STYLE.get(value, "bold red"))

    models = Table(title=title(s), title_justify="left", expand=False)
    for h in MODEL_HEADERS:
        models.add_column(h, overflow="fold", no_wrap=h not in ("MEMORY", "LAST ERROR"))
    for m in s.models:
        row = model_row(m, s.taken_at)
        models.add_row(row[0], styled(row[1]), *row[2:])
    programs = Table()
    for h in PROGRAM_HEADERS:
        programs.add_column(h)
    for p in s.programs:
        row = program_row(p)
        programs.add_row(row[0], styled(row[1]), *row[2:])
    verdict = Text("healthy", style="bold green") if s.healthy else Text("NOT HEALTHY", style="bold red")
    return Group(models, programs, verdict, *(Text(f"  {p}", style="red") for p in s.problems),
                 *(Text(f"note: {n}", style="dim") for n in s.notes))
