"""The documents stay true: every config key and metric the code knows is documented (and nothing else is), and every
relative link in README.md, docs/ and the READMEs of ansible/ and bench/ resolves. Fast: no server is started."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from appliance.config import model as config_model
from appliance.metrics import proxy as proxy_metrics
from tests.helpers import REPO

DOCS = REPO / "docs"
#: ApplianceConfig fields that are not keys of the TOML file.
NOT_KEYS = {"source"}
#: The exporter's own families: the name and the labels passed to prometheus_client's *MetricFamily.
FAMILY = re.compile(r'(?:Gauge|Counter|Histogram)MetricFamily\(\s*"(\w+)"(?:(?!MetricFamily\().)*?labels=\[([^\]]*)\]',
                    re.DOTALL)
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)\)")
README_MAX_BYTES = 10 * 1024


def table(text: str, head: str) -> list[list[str]]:
    """The cells of the markdown table whose header row is ``head``, one list per row."""
    lines = text[text.index(head):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# Configuration keys


def code_keys() -> set[str]:
    """``section.key`` for the sections' fields, the plain field name for a ``[[models]]`` key, ``[name.<name>] key``
    for a key of named tables (``[clients.<name>] weight``), ``[name]`` for a table of the file's own keys
    (``[memory]``: MiB per device)."""
    keys: set[str] = set()
    hints = typing.get_type_hints(config_model.ApplianceConfig)
    for f in dataclasses.fields(config_model.ApplianceConfig):
        hint = hints[f.name]
        if f.name in NOT_KEYS:
            continue
        if dataclasses.is_dataclass(hint):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(hint)}
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            keys |= {g.name for g in dataclasses.fields(typing.get_args(hint)[0])}
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            keys |= {f"[{f.name}.<name>] {g.name}" for g in dataclasses.fields(typing.get_args(hint)[1])}
        else:
            keys.add(f"[{f.name}]")
    return keys


def documented_keys(text: str) -> set[str]:
    """The backticked names in the key column: ``server.bind``, ``server.tls_cert_file`` / ``server.tls_key_file``,
    ``supervision.backoff_initial_s`` / ``backoff_max_s`` (the section carries over), ``[[models]] name``, ``aliases``,
    ``ctx_size``, ``gpu_layers``, ..., ``[memory] <device>``, ``[clients.<name>] models``, ``max_concurrent`` (the
    table carries over too)."""
    keys: set[str] = set()
    for row in table(text, "| key | default | meaning |"):
        section = ""
        for name in ticked(row[0]):
            if name.startswith("[[models]] "):
                keys.add(name.removeprefix("[[models]] "))
            elif name.startswith("[") and "." in name.partition("]")[0]:
                section, _, key = name.partition("] ")
                section += "]"
                keys.add(f"{section} {key}")
            elif name.startswith("["):
                keys.add(name[:name.index("]") + 1])
            elif "." in name:
                section = name.partition(".")[0]
                keys.add(name)
            elif section.startswith("["):
                keys.add(f"{section} {name}")
            else:
                keys.add(f"{section}.{name}" if section else name)
    return keys


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    code, documented = code_keys(), documented_keys((DOCS / "configuration.md").read_text())
    assert {"server.bind", "name", "[memory]", "[clients.<name>] weight"} <= code  # the reading of the code works
    assert not code - documented, f"keys missing from docs/configuration.md: {sorted(code - documented)}"
    assert not documented - code, f"docs/configuration.md documents unknown keys: {sorted(documented - code)}"


# Metrics


def served_metrics() -> dict[str, set[str]]:
    """Every appliance_* family the exporter serves, without ``_total``, with its labels."""
    served: dict[str, set[str]] = {}
    for obj in vars(proxy_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            served[obj._name] = set(obj._labelnames)
    source = (REPO / "appliance/metrics/exporter.py").read_text()
    for name, labels in FAMILY.findall(source):
        served[name] = set(re.findall(r'"(\w+)"', labels))
    return {name.removesuffix("_total"): labels for name, labels in served.items()}


def documented_metrics(text: str) -> dict[str, set[str]]:
    """The metric table's names (``a`` / ``b`` and ``a``, ``b`` rows too), without ``_total``, with their labels."""
    documented: dict[str, set[str]] = {}
    for row in table(text, "| metric | type | labels | meaning |"):
        labels = {label.strip().removeprefix("+ ") for label in row[2].split(",") if label.strip()}
        for name in ticked(row[0]):
            if name.startswith("appliance_"):
                documented[name.removesuffix("_total")] = labels
    return documented


def test_every_served_metric_is_documented_with_its_labels() -> None:
    served, documented = served_metrics(), documented_metrics((DOCS / "metrics.md").read_text())
    assert {"appliance_requests", "appliance_in_flight", "appliance_model_load_seconds"} <= set(served)
    missing = set(served) - set(documented)
    assert not missing, f"metrics missing from docs/metrics.md: {sorted(missing)}"
    assert not set(documented) - set(served), f"docs/metrics.md documents unknown metrics: " \
        f"{sorted(set(documented) - set(served))}"
    for name, labels in served.items():
        assert labels == documented[name], f"{name}: served with labels {sorted(labels)}, documented " \
            f"{sorted(documented[name])}"


# Links


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens; repeats get -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def documents() -> list[Path]:
    """README.md, docs/, and the READMEs that link into them."""
    return [REPO / "README.md", *sorted(DOCS.glob("*.md")), REPO / "ansible/README.md", REPO / "bench/README.md",
            REPO / "bench/RESULTS.md"]


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # absolute: http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(f"{target}: no such heading")
    return broken


def test_every_relative_link_resolves() -> None:
    broken = {doc.relative_to(REPO).as_posix(): links for doc in documents() if (links := broken_links(doc))}
    assert not broken, broken


def test_the_readme_is_a_front_door() -> None:
    """Short, and standing alone: every link it has stays inside the repository."""
    readme = REPO / "README.md"
    assert len(readme.read_bytes()) <= README_MAX_BYTES
    text = FENCE.sub("", readme.read_text())
    assert not [t for t in LINK.findall(text) if re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert "```mermaid" in readme.read_text()
    for doc in ("configuration.md", "api.md", "metrics.md", "design.md", "operations.md", "fleet.md", "testing.md",
                "on-demand.md", "openapi.yaml"):
        assert f"](docs/{doc})" in text, f"the README's map of the docs lacks docs/{doc}"
