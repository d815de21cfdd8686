"""The uvicorn internals appliance/proxy/protocol.py relies on are still there, as it uses them.

protocol.py subclasses uvicorn's httptools protocol (not a public API): it overrides parser callbacks and connection
events, calls private methods, reads per-connection attributes and those of the request's response cycle, and inlines
three of uvicorn's methods. pyproject.toml caps uvicorn at the tested minor; when a new one is locked, these tests say
what changed. Each failure names the internal and what protocol.py does with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import inspect
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn
from packaging.requirements import Requirement
from uvicorn.config import Config
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

ROOT = Path(__file__).resolve().parents[2]
SEE = "appliance/proxy/protocol.py relies on it; see docs/operations.md (Upgrade a dependency)"

# Methods protocol.py overrides (and mostly calls through super()) or calls, with the parameters it passes.
METHODS = {
    "__init__": ["self", "config", "server_state", "app_state", "_loop"],
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
    "data_received": ["self", "data"],
    "on_message_begin": ["self"],
    "on_url": ["self", "url"],
    "on_header": ["self", "name", "value"],
    "on_headers_complete": ["self"],
    "on_message_complete": ["self"],
    "on_response_complete": ["self"],
    "shutdown": ["self"],
    "timeout_keep_alive_handler": ["self"],
    "_start_asgi_task": ["self", "cycle", "app"],
}
# Per-connection attributes protocol.py reads or sets, as uvicorn's __init__ leaves them.
CONNECTION_ATTRIBUTES = [
    "loop", "logger", "parser", "server_state", "connections", "transport", "flow", "client", "pipeline", "scope",
    "headers", "expect_100_continue", "cycle", "timeout_keep_alive_task", "timeout_keep_alive",
]
# What on_message_begin() sets up for each request and the inlined on_url/on_header extend.
REQUEST_ATTRIBUTES = {"url": bytes, "headers": list, "scope": dict}
# The response cycle's attributes protocol.py reads or sets (receive is put in the scope; transport is replaced).
CYCLE_ATTRIBUTES = [
    "receive", "transport", "response_started", "response_complete", "disconnected", "message_event",
    "waiting_for_100_continue", "more_body",
]
# Statuses protocol.py answers itself with STATUS_LINE.
STATUSES = [400, 405, 408, 413, 414, 431, 503, 505]
# uvicorn's methods that protocol.py copies instead of calling (per-request cost), by the sha256 of their source as
# reviewed for uvicorn 0.55. A new digest: compare the new source with protocol.py's copy, port what matters, then
# update the digest here. (0.55's on_header strips trailing whitespace from header values; protocol.py's does not.)
INLINED = {
    "on_url": "37be44e962b04ca8",
    "on_header": "1e86ebb6cea0458c",
    "on_response_complete": "64e254f28e389e76",
}


def changed(name: str, what: str) -> str:
    return f"uvicorn {uvicorn.__version__} changed {name} ({what}): {SEE}"


async def _app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


@pytest.fixture
def protocol() -> Iterator[HttpToolsProtocol]:
    loop = asyncio.new_event_loop()
    try:
        config = Config(_app, interface="asgi3", log_config=None, lifespan="off")
        yield HttpToolsProtocol(config, ServerState(), {}, loop)
    finally:
        loop.close()


def test_base_class_and_module_names() -> None:
    assert inspect.isclass(HttpToolsProtocol) and issubclass(HttpToolsProtocol, asyncio.Protocol), changed(
        "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol", "the base class of LimitedHttpProtocol")
    for name in ("STATUS_LINE", "HttpToolsProtocol", "RequestResponseCycle"):
        assert hasattr(httptools_impl, name), changed(f"httptools_impl.{name}", "imported or used by protocol.py")


@pytest.mark.parametrize("name", METHODS)
def test_method_signatures(name: str) -> None:
    method: Callable[..., Any] | None = getattr(HttpToolsProtocol, name, None)
    assert callable(method), changed(f"HttpToolsProtocol.{name}", "overridden or called, now missing")
    params = list(inspect.signature(method).parameters)
    assert params == METHODS[name], changed(f"HttpToolsProtocol.{name}", f"parameters {params}, not {METHODS[name]}")


@pytest.mark.parametrize("name", INLINED)
def test_inlined_methods_are_unchanged(name: str) -> None:
    digest = hashlib.sha256(inspect.getsource(getattr(HttpToolsProtocol, name)).encode()).hexdigest()[:16]
    assert digest == INLINED[name], changed(
        f"HttpToolsProtocol.{name}", f"protocol.py inlines a copy; new source digest {digest}, compare and port it")


def test_connection_attributes(protocol: HttpToolsProtocol) -> None:
    missing = [name for name in CONNECTION_ATTRIBUTES if not hasattr(protocol, name)]
    assert not missing, changed("HttpToolsProtocol.__init__", f"no longer sets {missing}")
    assert isinstance(protocol.parser, httptools.HttpRequestParser), changed(
        "HttpToolsProtocol.parser", "protocol.py feeds it and replaces it with its own httptools parser")
    assert protocol.connections is protocol.server_state.connections, changed(
        "HttpToolsProtocol.connections", "the worker's open connections, counted for max_connections_per_worker")
    assert isinstance(protocol.timeout_keep_alive, int | float), changed(
        "HttpToolsProtocol.timeout_keep_alive", "the keep-alive deadline protocol.py arms itself")
    protocol.on_message_begin()
    for name, kind in REQUEST_ATTRIBUTES.items():
        assert isinstance(getattr(protocol, name, None), kind), changed(
            f"HttpToolsProtocol.{name}", f"on_message_begin() no longer sets it to a {kind.__name__}")
    assert protocol.scope["headers"] is protocol.headers, changed(
        "HttpToolsProtocol.headers", "protocol.py's on_header appends to the list the scope holds")


def test_server_state() -> None:
    state = ServerState()
    for name, kind in {"total_requests": int, "default_headers": list, "connections": set}.items():
        assert isinstance(getattr(state, name, None), kind), changed(
            f"ServerState.{name}", f"read as a {kind.__name__}")


def test_flow_control() -> None:
    flow = FlowControl(asyncio.Transport())
    assert flow.read_paused is False, changed("FlowControl.read_paused", "the body timer skips time not reading")
    assert callable(getattr(flow, "resume_reading", None)), changed("FlowControl.resume_reading", "called")


def test_response_cycle_attributes() -> None:
    params = list(inspect.signature(RequestResponseCycle.__init__).parameters)[1:]
    cycle = RequestResponseCycle(**dict.fromkeys(params))
    missing = [name for name in CYCLE_ATTRIBUTES if not hasattr(cycle, name)]
    assert not missing, changed("RequestResponseCycle", f"no longer has {missing}")
    assert inspect.iscoroutinefunction(cycle.receive), changed("RequestResponseCycle.receive", "the app awaits it")


def test_status_lines() -> None:
    for status in STATUSES:
        line = STATUS_LINE.get(status)
        assert isinstance(line, bytes) and line.startswith(b"HTTP/1.1 %d " % status) and line.endswith(b"\r\n"), (
            changed("httptools_impl.STATUS_LINE", f"the status line of {status} protocol.py answers with"))


def test_httptools_parser_interface() -> None:
    for name in ("feed_data", "get_method", "get_http_version", "should_upgrade", "set_dangerous_leniencies"):
        assert hasattr(httptools.HttpRequestParser, name), (
            f"httptools {httptools.__version__} lost HttpRequestParser.{name}: {SEE}")
    for name in ("HttpParserUpgrade", "HttpParserError"):
        assert issubclass(getattr(httptools, name, type), Exception), (
            f"httptools {httptools.__version__} lost {name}, which feed_data raises: {SEE}")


@pytest.mark.parametrize(("name", "version"), [("uvicorn", uvicorn.__version__),
                                               ("uvicorn-worker", importlib.metadata.version("uvicorn-worker"))])
def test_uvicorn_and_uvicorn_worker_are_capped(name: str, version: str) -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    (req,) = [Requirement(dep) for dep in deps if Requirement(dep).name == name]
    assert any(spec.operator == "<" for spec in req.specifier), (
        f"pyproject.toml's {req} has no upper bound: {SEE} (cap it at the next minor)")
    assert version in req.specifier, f"{name} {version} is installed, outside {req}"


# appliance/proxy/worker.py: DrainingServer extends uvicorn's Server, ApplianceWorker extends uvicorn-worker's worker.
WORKER_SEE = "appliance/proxy/worker.py relies on it; see docs/operations.md (Upgrade a dependency)"


def test_the_server_and_worker_internals_worker_py_uses() -> None:
    from uvicorn.server import Server
    from uvicorn_worker import UvicornWorker

    for name, params in (("serve", ["self", "sockets"]), ("handle_exit", ["self", "sig", "frame"]),
                         ("on_tick", ["self", "counter"])):
        got = list(inspect.signature(getattr(Server, name)).parameters)
        assert got == params, f"uvicorn {uvicorn.__version__} changed Server.{name}{got}: {WORKER_SEE}"
    server = Server(Config(app=None))
    for name in ("server_state", "should_exit", "started"):
        assert hasattr(server, name), f"uvicorn {uvicorn.__version__} lost Server.{name}: {WORKER_SEE}"
    assert "self.servers" in inspect.getsource(Server), f"uvicorn's Server no longer keeps .servers: {WORKER_SEE}"
    assert isinstance(UvicornWorker.CONFIG_KWARGS, dict), f"uvicorn-worker lost CONFIG_KWARGS: {WORKER_SEE}"
    for name in ("_serve", "_install_sigquit_handler"):
        assert callable(getattr(UvicornWorker, name, None)), f"uvicorn-worker lost UvicornWorker.{name}: {WORKER_SEE}"
