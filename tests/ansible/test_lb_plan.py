"""The load balancer's routing plan (ansible/filter_plugins/appliance_lb.py): what the inventory may say, and that its
fixed knowledge of the appliance (route kinds, defaults) matches the package."""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import yaml

from appliance.config import ModelConfig
from appliance.proxy.routes import PROPS, ROUTES
from tests.ansible.test_tls_templates import ANSIBLE, ROLES

_spec = importlib.util.spec_from_file_location("appliance_lb", ANSIBLE / "filter_plugins/appliance_lb.py")
assert _spec is not None and _spec.loader is not None
plugin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plugin)
plan = plugin.appliance_lb_plan


def host(name: str, *models: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": "198.18.0.1", "port": 8080, "models": list(models)}


def test_backends_servers_and_maps() -> None:
    p = plan([host("n1", {"name": "chat-a", "aliases": ["gpt-*", "a"], "parallel": 4}, {"name": "e", "kind": "embed"}),
              host("n2", {"name": "chat-a"}, {"name": "org/model:7b"})], 1)
    assert p["problems"] == []
    by_name = {m["name"]: m for m in p["models"]}
    assert [(s["name"], s["maxconn"]) for s in by_name["chat-a"]["servers"]] == [("n1", 5), ("n2", 3)]
    # HAProxy's proxy names take no "/": the model keeps its name everywhere else.
    assert by_name["org/model:7b"]["backend"] == "m_org_model:7b"
    assert p["exact_map"].splitlines() == ["chat-a m_chat-a", "a m_chat-a", "e m_e", "org/model:7b m_org_model:7b"]
    regex, backend = p["pattern_map"].split()
    assert backend == "m_chat-a" and re.match(regex, "gpt-4o") and not re.match(regex, "xgpt-4o")
    # Each host's own first model of a kind serves the requests of that kind that name none.
    assert [(s["name"], s["track"]) for s in p["defaults"]["chat"]["servers"]] == [("n1", "m_chat-a/n1"),
                                                                                    ("n2", "m_chat-a/n2")]
    assert [s["track"] for s in p["defaults"]["embed"]["servers"]] == ["m_e/n1"]


def test_what_cannot_be_routed_is_named() -> None:
    p = plan([host("n1", {"name": "x", "kind": "chat", "aliases": ["shared", "bad alias"]}, {"name": "50%"},
                   {"name": "y", "parallel": 4, "max_queue": 6}, {"name": "e", "kind": "embed", "parallel": 1},
                   {"name": "c", "parallel": 1}),
              host("n2", {"name": "x", "kind": "embed"}, {"name": "z", "aliases": ["shared"]})], 1)
    problems = "\n".join(p["problems"])
    assert "n1: model 'x': alias 'bad alias'" in problems
    assert "n1: model '50%'" in problems
    # y is not the host's first chat model: two backends send to it; e is its first embed model, so three.
    assert "n1: model 'y': max_queue 6 is below the 6 requests" not in problems
    assert "n1: model 'e': max_queue 4 is below the 5 requests the load balancer may send beyond its parallel 1 " \
           "(3 backends" in problems
    assert "model 'c'" not in problems
    assert "n2: model 'x': kind 'embed' here, 'chat' on another host" in problems
    assert "n2: model 'z': 'shared' names model 'x' on another host" in problems


def test_the_route_kinds_match_the_proxys_routes() -> None:
    paths = yaml.safe_load((ROLES / "appliance_lb/vars/main.yml").read_text())["__appliance_lb_kind_paths"]
    want: dict[str, list[str]] = {}
    for r in (*ROUTES, PROPS):
        want.setdefault(r.kinds[0], []).append(r.path)
    assert {k: sorted(v) for k, v in paths.items()} == {k: sorted(v) for k, v in want.items()}


def test_the_defaults_match_the_appliance() -> None:
    assert ModelConfig.__dataclass_fields__["parallel"].default == plugin.DEFAULT_PARALLEL
    lb_vars = yaml.safe_load((ROLES / "appliance_lb/vars/main.yml").read_text())
    role_models = yaml.safe_load((ROLES / "appliance/defaults/main.yml").read_text())["appliance_models"]
    assert lb_vars["__appliance_lb_default_models"] == [{"name": m["name"], "kind": m["kind"]} for m in role_models]
