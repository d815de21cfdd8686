"""The Falcon ASGI reverse proxy: the OpenAI (and Anthropic) API in front of the llama-server children.

The pieces: ``routes`` (what is served), ``forward`` (how: one mechanism for every route), ``relay`` (streaming back),
``exchange`` (metrics and events of one request), ``middleware`` (request id, API key, CORS), ``resources`` (what the
proxy answers itself) and ``runtime`` (per-worker state).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import falcon
import falcon.asgi

from appliance.config import ApplianceConfig, load
from appliance.proxy.errors import ApiError, handle_api_error, handle_http_error, handle_unexpected
from appliance.proxy.forward import Forward, Props, Receive
from appliance.proxy.middleware import Middleware
from appliance.proxy.resources import Health, Livez, ModelHealth, Models, Unexposed
from appliance.proxy.routes import PROPS, ROUTES, UNEXPOSED
from appliance.proxy.runtime import Runtime

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

CONFIG_ENV = "APPLIANCE_CONFIG"


class ProxyApp:
    """The Falcon app and the worker's runtime state.

    The worker serves ``self.falcon`` itself, through the appliance's HTTP layer (``protocol``), which puts what the
    app needs beyond Falcon into the scope (``receive``, the disconnect watch): a wrapper here would be one more
    coroutine per request. ``__call__`` exists because gunicorn loads only a callable app."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        self.runtime = rt = Runtime(cfg)
        app = falcon.asgi.App(middleware=[Middleware(rt)], cors_enable=False)
        app.req_options.auto_parse_form_urlencoded = False
        for route in ROUTES:
            app.add_route(route.path, Forward(rt, route))
        app.add_route("/props", Props(rt, PROPS))
        for path, reason in UNEXPOSED.items():
            app.add_route(path, Unexposed(reason))
        models = Models(rt)
        app.add_route("/v1/models", models)
        app.add_route("/models", models)
        app.add_route("/health", Health(rt))
        app.add_route("/health/models/{name:path}", ModelHealth(rt))
        app.add_route("/livez", Livez())
        app.add_error_handler(Exception, handle_unexpected)
        app.add_error_handler(falcon.HTTPError, handle_http_error)
        app.add_error_handler(ApiError, handle_api_error)
        self.falcon = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.falcon(scope, receive, send)  # type: ignore[arg-type]


def from_env() -> ProxyApp:
    """Factory for gunicorn (``appliance.proxy.app:from_env()``): the config path comes from $APPLIANCE_CONFIG."""
    return ProxyApp(load(os.environ[CONFIG_ENV], check_files=False))
