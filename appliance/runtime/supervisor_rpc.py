"""supervisord's XML-RPC interface over its unix socket (blocking: call it from a thread in async code)."""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path
from typing import Any


def server(socket_path: Path) -> Any:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, serverurl=f"unix://{socket_path}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def all_process_info(socket_path: Path) -> list[dict[str, Any]]:
    infos: list[dict[str, Any]] = server(socket_path).supervisor.getAllProcessInfo()
    return infos
