"""OpenAI-shaped error bodies: every error a client sees is ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon
import falcon.asgi

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


def error_body(status: int, message: str, code: str) -> bytes:
    err = {"message": message, "type": _TYPES.get(status, "server_error"), "param": None, "code": code}
    return json.dumps({"error": err}).encode()


def sse_error_event(message: str, code: str) -> bytes:
    """The last event of a stream whose upstream failed: clients parsing SSE see an error instead of a hang."""
    return b"data: " + error_body(502, message, code) + b"\n\n"


class ApiError(Exception):
    """Raised anywhere in a responder; rendered as an OpenAI error with ``status``."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def render(resp: falcon.asgi.Response, status: int, message: str, code: str, headers: dict[str, str] | None = None
           ) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(status, message, code)
    resp.stream = None
    for name, value in (headers or {}).items():
        resp.set_header(name, value)


async def handle_api_error(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: ApiError, params: Any) -> None:
    render(resp, ex.status, ex.message, ex.code, ex.headers)


_FALCON_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "request_too_large"}


async def handle_http_error(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: falcon.HTTPError, params: Any
                            ) -> None:
    """Falcon's own 404/405 (unknown path, wrong method) in OpenAI shape, keeping Allow for 405."""
    status = ex.status_code
    message = {
        404: f"no route for {req.method} {req.path}; this server speaks the OpenAI API under /v1",
        405: f"method {req.method} is not allowed on {req.path}",
    }.get(status, ex.title or "error")
    render(resp, status, message, _FALCON_CODES.get(status, "error"))
    for name, value in dict(ex.headers or {}).items():
        resp.set_header(name, value)


async def handle_unexpected(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: Exception, params: Any) -> None:
    log.exception("unhandled error on %s %s", req.method, req.path, exc_info=ex)
    render(resp, 500, "internal error in the proxy; see its log", "internal_error")
