"""The routes the proxy answers itself: the model list, health, liveness, and the routes it refuses to expose."""

from __future__ import annotations

import json
from importlib.metadata import version

import falcon
import falcon.asgi

from appliance.config.load import KINDS
from appliance.proxy.errors import ApiError
from appliance.proxy.readiness import ModelState
from appliance.proxy.runtime import Runtime

#: Set by the fleet's load balancer on ``GET /v1/models``: the fleet's models as a JSON list of ``{"id", "kind",
#: "aliases"}``, so that a listing through the load balancer shows every model of the fleet, whichever host answers.
FLEET_MODELS_HEADER = "x-appliance-fleet-models"


def _fleet_models(header: str | None) -> list[dict[str, object]]:
    """The well-formed entries of the fleet header; anything else is ignored (it only ever adds names to the
    caller's own listing, so a client that sends it learns nothing it did not write)."""
    if not header:
        return []
    try:
        entries = json.loads(header)
    except ValueError:
        return []
    if not isinstance(entries, list):
        return []
    return [{"id": e["id"], "kind": e.get("kind", "chat"), "aliases": list(e.get("aliases", []))}
            for e in entries
            if isinstance(e, dict) and isinstance(e.get("id"), str) and e.get("kind", "chat") in KINDS
            and isinstance(e.get("aliases", []), list) and all(isinstance(a, str) for a in e.get("aliases", []))]


class Models:
    """The configured models, each with its state (an on-demand model may be unloaded: its first request loads it).
    Through the fleet's load balancer, also the models that only other hosts serve, without ``load`` and ``state``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rt = self.rt
        current = rt.readiness.current
        # A client limited to some models sees only those (and, through the load balancer, the fleet's of them).
        visible = rt.gate.visible(req.context.exchange.client)
        data: list[dict[str, object]] = [
            {"id": m.name, "object": "model", "created": rt.started, "owned_by": "appliance", "kind": m.kind,
             "aliases": list(m.aliases), "load": m.load, "state": current(m.name).state}
            for m in rt.cfg.models if visible is None or m.name in visible]
        here = {m.name for m in rt.cfg.models}
        for e in _fleet_models(req.get_header(FLEET_MODELS_HEADER)):
            aliases = e["aliases"]
            if visible is not None and not visible.intersection([e["id"], *(aliases if isinstance(aliases, list)
                                                                            else ())]):
                continue
            if e["id"] not in here:
                here.add(str(e["id"]))
                data.append({"id": e["id"], "object": "model", "created": rt.started, "owned_by": "appliance",
                             "kind": e["kind"], "aliases": e["aliases"]})
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps({"object": "list", "data": data}).encode()

    on_head = on_get


def _model_doc(s: ModelState) -> dict[str, object]:
    doc: dict[str, object] = {"state": s.state, "since": round(s.since, 3), "restarts": s.restarts}
    if s.error:
        doc["error"] = s.error
    return doc


class Health:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.version = version("appliance")

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rt = self.rt
        status, warm = rt.readiness.summary()
        if rt.draining:
            status = "draining"
        default = rt.default_model("chat") or rt.cfg.models[0]
        doc = {
            "status": status,
            "warm_up_state": warm,
            "backend": "llama-server",
            "model": default.name,
            "models": {n: _model_doc(rt.readiness.current(n)) for n in rt.readiness.models},
            "version": self.version,
        }
        resp.status = 200 if status == "ok" else 503
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps(doc).encode()

    on_head = on_get


class ModelHealth:
    """``GET /health/models/{name}``: whether this host serves one model now, for a load balancer's per-model checks.

    200 while a request for it would be served: it is ready, or it is on demand and its request would load it. 503
    while it (re)starts, has failed, or the host drains: the balancer then sends that model's requests to other hosts,
    and this host keeps its other models' traffic. Names and aliases are accepted; patterns are not (they are routing
    rules, not models)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        rt = self.rt
        model = rt.names.get(name)
        if model is None:
            raise ApiError(404, f"no model or alias {name!r} on this host", "model_not_found")
        serving = not rt.draining and rt.readiness.can_serve(model)
        doc = {"model": model.name, "load": model.load, "serving": serving, "draining": rt.draining,
               **_model_doc(rt.readiness.current(model.name))}
        resp.status = 200 if serving else 503
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps(doc).encode()

    on_head = on_get


class Livez:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"status":"ok"}'

    on_head = on_get


class Unexposed:
    """A llama-server route that is not served here, with the reason (``routes.UNEXPOSED``); nothing is forwarded."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def _refuse(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, **params: str) -> None:
        raise ApiError(404, f"{req.path} is not served by this appliance: {self.reason}", "not_exposed")

    on_get = on_post = on_delete = on_put = _refuse
