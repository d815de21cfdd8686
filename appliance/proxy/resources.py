"""The routes the proxy answers itself: the model list, health, liveness, and the routes it refuses to expose."""

from __future__ import annotations

import json
from importlib.metadata import version

import falcon
import falcon.asgi

from appliance.proxy.errors import ApiError
from appliance.proxy.readiness import ModelState
from appliance.proxy.runtime import Runtime


class Models:
    """The configured models, each with its state (an on-demand model may be unloaded: its first request loads it)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rt = self.rt
        current = rt.readiness.current
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps({
            "object": "list",
            "data": [{"id": m.name, "object": "model", "created": rt.started, "owned_by": "appliance",
                      "kind": m.kind, "aliases": list(m.aliases), "load": m.load, "state": current(m.name).state}
                     for m in rt.cfg.models],
        }).encode()

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
