"""``appliance usage``: the usage ledger as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from appliance.config import ApplianceConfig
from appliance.usage import GROUP_FIELDS

if TYPE_CHECKING:
    from rich.table import Table

COUNTS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"(\d+)([mhdw])")

Rows = list[dict[str, str | int]]


def parse_since(value: str, now: float | None = None) -> float:
    """``30m``, ``12h``, ``7d``, ``2w`` before now, or an ISO 8601 date or date and time (UTC unless it says
    otherwise), as unix time; argparse's type for ``--since``."""
    m = _RELATIVE.fullmatch(value.strip())
    if m:
        return (time.time() if now is None else now) - int(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected a duration before now (30m, 12h, 7d, 2w: minutes, hours, days, weeks) or an ISO "
            "date or date and time in UTC (2026-12-01, 2026-12-01T09:00)") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def parse_by(value: str) -> tuple[str, ...]:
    """A comma-separated subset of GROUP_FIELDS, in the order given (repeats dropped); argparse's type for ``--by``."""
    fields = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    unknown = [f for f in fields if f not in GROUP_FIELDS]
    if unknown or not fields:
        what = f"unknown field(s) {', '.join(unknown)}" if unknown else "no field given"
        raise argparse.ArgumentTypeError(f"{what}; known: {', '.join(GROUP_FIELDS)} (comma-separated)")
    return fields


def _heading(field: str) -> str:
    return field.removesuffix("_tokens").upper()


def _total(rows: Rows, count: str) -> str:
    return str(sum(int(r[count]) for r in rows))


def plain_table(rows: Rows, by: tuple[str, ...]) -> str:
    """Aligned columns (numbers right-aligned, unlike `appliance status`'s text columns) and a TOTAL line last."""
    headers = [_heading(f) for f in (*by, *COUNTS)]
    body = [[str(r[f]) for f in (*by, *COUNTS)] for r in rows]
    total = ["TOTAL", *[""] * (len(by) - 1), *(_total(rows, c) for c in COUNTS)]
    widths = [max(len(line[i]) for line in [headers, *body, total]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < len(by) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), *(line(b) for b in body), line(total)])


def rich_table(rows: Rows, by: tuple[str, ...], title: str) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_footer=True)
    for i, f in enumerate(by):
        table.add_column(_heading(f), footer="TOTAL" if i == 0 else "")
    for c in COUNTS:
        table.add_column(_heading(c), justify="right", footer=_total(rows, c))
    for r in rows:
        table.add_row(*(str(r[f]) for f in (*by, *COUNTS)))
    return table


def to_csv(rows: Rows, by: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*by, *COUNTS])
    writer.writerows([r[f] for f in (*by, *COUNTS)] for r in rows)
    return out.getvalue().rstrip("\n")


def run_usage(cfg: ApplianceConfig, since: float, by: tuple[str, ...], fmt: str) -> int:
    """Print the report; 0, or 1 when the ledger cannot be read."""
    # Imported here: the parser imports this module for every `appliance` command, and the ledger pulls in
    # prometheus_client, slow to import and not to be imported before its multiprocess directory is set.
    from appliance.usage.ledger import LedgerError, hour_of, ledger_path, query

    path = ledger_path(cfg)
    rows: Rows = []
    if not path.exists():
        print(f"no usage recorded yet: {path} does not exist", file=sys.stderr)
    else:
        try:
            rows = query(path, since, by)
        except LedgerError as e:
            print(f"usage: {e}", file=sys.stderr)
            return 1
    if fmt == "json":
        print(json.dumps(rows))
    elif fmt == "csv":
        print(to_csv(rows, by))
    else:
        start = datetime.fromtimestamp(hour_of(since), UTC).strftime("%Y-%m-%d %H:%M")
        title = f"usage since {start} UTC ({path})"
        if sys.stdout.isatty():
            from rich.console import Console

            Console().print(rich_table(rows, by, title))
        else:
            print(f"{title}\n{plain_table(rows, by)}")
    return 0
