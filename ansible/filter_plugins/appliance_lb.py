"""The load balancer's routing plan, from what the inventory gives each appliance host.

HAProxy routes by the request's model (``ansible/roles/appliance_lb``): one backend per model with the hosts that
serve it, each checked on that host's ``/health/models/<name>``; a twin backend per model balanced by a consistent hash
of the conversation's key (affinity), whose servers track the first's checks; per route kind, the hosts' own defaults
for requests that name no model; and maps from names, aliases and alias patterns to backends. Computed here, in Python,
so that the template only prints it and the rules (what may share a name, what a pattern matches) are tested once.
"""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any

# Characters HAProxy accepts in a proxy (backend) name; a model name with others is written with "_" there.
_PROXY_NAME = re.compile(r"[^A-Za-z0-9_.:-]")
# A model name or alias goes into map files (whitespace separates key and value, "#" starts a comment) and into
# quoted log-format strings (a "%" starts a field there): printable ASCII without those is what clients send.
_PRINTABLE = re.compile(r"^[!-~]+$")
_UNSAFE = frozenset("%'\"\\#")
_PATTERN_CHARS = frozenset("*?[")
KINDS = ("chat", "embed", "rerank")
# A model's slots when its entry does not say (the appliance's own default, ModelConfig.parallel).
DEFAULT_PARALLEL = 2


def _routable(name: str) -> bool:
    return bool(_PRINTABLE.match(name)) and not _UNSAFE.intersection(name)


def _is_pattern(name: str) -> bool:
    return any(c in _PATTERN_CHARS for c in name)


def _server(host: dict[str, Any], maxconn: int) -> dict[str, Any]:
    return {"name": host["name"], "address": host["address"], "port": int(host["port"]),
            "tls": bool(host.get("tls", False)), "maxconn": maxconn}


def appliance_lb_plan(hosts: list[dict[str, Any]], margin: int = 1) -> dict[str, Any]:
    """The routing plan for ``hosts`` (``[{name, address, port, tls, models: [appliance_models entries]}]``).

    Returns ``problems`` (empty when the fleet can be routed) besides ``models`` (one per model name, in the order
    first seen: backend names, kind, servers with their maxconn = the host's ``parallel`` + ``margin``), ``defaults``
    (per kind: where a request that names no model goes, each host to its own first model of that kind), the map files'
    text and the catalogue ``GET /v1/models`` shows through the load balancer."""
    problems: list[str] = []
    models: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}  # exact name or alias -> model
    patterns: list[tuple[str, str]] = []  # (pattern, model), in host then config order
    defaults: dict[str, list[dict[str, Any]]] = {}
    backends: set[str] = set()
    for host in hosts:
        seen_kinds: set[str] = set()
        for m in host.get("models") or []:
            name = str(m.get("name", ""))
            kind = str(m.get("kind", "chat"))
            where = f"{host['name']}: model {name!r}"
            if not _routable(name) or _is_pattern(name):
                problems.append(f"{where}: the load balancer routes names of printable ASCII without spaces, "
                                "quotes, backslashes, '%', '#' or pattern characters")
                continue
            entry = models.get(name)
            if entry is None:
                base = "m_" + _PROXY_NAME.sub("_", name)
                backend, n = base, 2
                while backend in backends:  # two names that differ only in characters HAProxy does not take
                    backend, n = f"{base}_{n}", n + 1
                backends.add(backend)
                entry = models[name] = {"name": name, "kind": kind, "backend": backend,
                                        "affinity_backend": "a_" + backend[2:], "aliases": [], "patterns": [],
                                        "servers": []}
            elif entry["kind"] != kind:
                problems.append(f"{where}: kind {kind!r} here, {entry['kind']!r} on another host: one name must be "
                                "one model across the fleet")
                continue
            parallel = int(m.get("parallel", DEFAULT_PARALLEL))
            # The model's backends (by load, by key, and for the host's default of a kind also without a model) each
            # send a host up to parallel + margin: its own bound (parallel + max_queue, 4 x parallel by default) must
            # take them all, or it answers 429 to the load balancer.
            backends_here = 3 if kind not in seen_kinds else 2
            need = (backends_here - 1) * parallel + backends_here * margin
            max_queue = int(m["max_queue"]) if m.get("max_queue") is not None else 4 * parallel
            if max_queue < need:
                problems.append(f"{where}: max_queue {max_queue} is below the {need} requests the load balancer may "
                                f"send beyond its parallel {parallel} ({backends_here} backends x parallel + "
                                "appliance_lb_slot_margin): raise max_queue or lower the margin")
            slots = parallel + margin
            entry["servers"].append(_server(host, slots))
            for alias in [name, *(str(a) for a in m.get("aliases") or [])]:
                if not _routable(alias):
                    problems.append(f"{where}: alias {alias!r}: the load balancer routes printable ASCII "
                                    "without spaces, quotes, backslashes, '%' or '#'")
                elif _is_pattern(alias):
                    if (alias, name) not in patterns:
                        patterns.append((alias, name))
                        entry["patterns"].append(alias)
                elif owner.setdefault(alias, name) != name:
                    problems.append(f"{where}: {alias!r} names model {owner[alias]!r} on another host")
                elif alias != name and alias not in entry["aliases"]:
                    entry["aliases"].append(alias)
            if kind not in seen_kinds:  # the host's own default for its first model of each kind
                seen_kinds.add(kind)
                defaults.setdefault(kind, []).append({**_server(host, slots),
                                                      "track": f"{entry['backend']}/{host['name']}"})
    exact = "".join(f"{alias} {models[name]['backend']}\n" for alias, name in owner.items())
    # fnmatch's own translation: the proxy matches patterns with fnmatch.fnmatchcase, so both agree on every name.
    pattern_map = "".join(f"{fnmatch.translate(p)} {models[name]['backend']}\n" for p, name in patterns)
    catalogue = [{"id": e["name"], "kind": e["kind"], "aliases": e["aliases"] + e["patterns"]} for e in models.values()]
    return {
        "problems": problems,
        "hosts": [{k: v for k, v in _server(h, 0).items() if k != "maxconn"} for h in hosts],
        "models": list(models.values()),
        "defaults": {k: {"backend": f"d_{k}", "servers": defaults[k]} for k in KINDS if k in defaults},
        "exact_map": exact,
        "pattern_map": pattern_map,
        "catalogue": json.dumps(catalogue, separators=(",", ":")),
    }


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"appliance_lb_plan": appliance_lb_plan}
