"""The error bodies the proxy writes itself, in the shape of the API the route follows.

OpenAI's, ``{"error": {"message", "type", "param", "code"}}``, everywhere but on Anthropic's routes
(``routes.is_anthropic``), which get Anthropic's, ``{"type": "error", "error": {"type", "message", "code"}}``: the
official SDKs read the type and the message from these places. ``code`` is the appliance's machine-readable reason in
both (Anthropic's SDK ignores fields it does not know).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon
import falcon.asgi

from appliance.proxy.routes import is_anthropic

log = logging.getLogger("appliance.proxy")

# The error "type" by status: OpenAI's values (SDKs map the status to an exception class), except 401, which is
# "authentication_error" as llama-server and Anthropic's API write it: a client of llama-server that checks the type
# sees what it sees there.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "invalid_request_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
    505: "invalid_request_error",
}


# Anthropic's error "type" by status. Statuses Anthropic's API does not answer get the type of their class: a client
# error is invalid_request_error (405, 408, 414, 431, 499, 505), a server error api_error. 502, 503 and 504 are the
# proxy's own trouble with a model (unreachable, not ready, draining, too slow), not Anthropic's overload:
# overloaded_error goes only with 529, and clients that branch on the type expect it there alone.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, code: str, anthropic: bool = False) -> bytes:
    """The JSON body of an error; ``anthropic`` (``routes.is_anthropic`` of the request's path) picks the shape."""
    if anthropic:
        return json.dumps({"type": "error", "error": {"type": anthropic_type(status), "message": message,
                                                      "code": code}}).encode()
    err = {"message": message, "type": _TYPES.get(status, "server_error"), "param": None, "code": code}
    return json.dumps({"error": err}).encode()


def sse_error_event(message: str, code: str, anthropic: bool = False) -> bytes:
    """The last event of a stream whose upstream failed: clients parsing SSE see an error instead of a hang.

    On Anthropic's routes it is an ``error`` event, as Anthropic's streams send one, which its SDK raises."""
    if anthropic:
        return b"event: error\ndata: " + error_body(502, message, code, True) + b"\n\n"
    return b"data: " + error_body(502, message, code) + b"\n\n"


class ApiError(Exception):
    """Raised anywhere in a responder or the middleware; rendered as an error with ``status``, in the shape of the
    request's route."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def render(req: falcon.asgi.Request, resp: falcon.asgi.Response, status: int, message: str, code: str,
           headers: dict[str, str] | None = None) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(status, message, code, is_anthropic(req.path))
    resp.stream = None
    for name, value in (headers or {}).items():
        resp.set_header(name, value)


async def handle_api_error(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: ApiError, params: Any) -> None:
    render(req, resp, ex.status, ex.message, ex.code, ex.headers)


_FALCON_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "request_too_large"}


async def handle_http_error(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: falcon.HTTPError, params: Any
                            ) -> None:
    """Falcon's own 404/405 (unknown path, wrong method) in the shape of the path's API, keeping Allow for 405."""
    status = ex.status_code
    message = {
        404: f"no route for {req.method} {req.path}; this server speaks the OpenAI API under /v1 and the Anthropic "
             "Messages API at /v1/messages",
        405: f"method {req.method} is not allowed on {req.path}",
    }.get(status, ex.title or "error")
    render(req, resp, status, message, _FALCON_CODES.get(status, "error"))
    for name, value in dict(ex.headers or {}).items():
        resp.set_header(name, value)


async def handle_unexpected(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: Exception, params: Any) -> None:
    log.exception("unhandled error on %s %s", req.method, req.path, exc_info=ex)
    render(req, resp, 500, "internal error in the proxy; see its log", "internal_error")
