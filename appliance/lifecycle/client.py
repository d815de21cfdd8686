"""A proxy worker's side of the model manager: wait until an on-demand model is loaded (``manager.Manager.serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

#: How long a worker keeps trying to reach a manager that is not there (restarting after a reload, say).
REACH_S = 5.0


def socket_path(runtime_dir: str) -> Path:
    """Where the manager listens (``<runtime_dir>/lifecycle.sock``)."""
    return Path(runtime_dir) / "lifecycle.sock"


class ManagerUnavailable(Exception):
    """No model manager answers on this host."""


async def wait_loaded(path: Path, model: str, timeout_s: float, gone: asyncio.Future[None]) -> dict[str, Any]:
    """The manager's answer for ``model``: ``{"ok": true, "waited_s": ...}`` once it is loaded, or ``{"ok": false,
    "status", "code", "message", "retry_after"}``. When ``gone`` completes (the client left) the connection is closed,
    which gives the place up. Raises ManagerUnavailable when no manager answers."""
    deadline = time.monotonic() + timeout_s
    unreachable_since: float | None = None
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError as e:
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since >= REACH_S or now >= deadline or gone.done():
                raise ManagerUnavailable(str(e)) from None
            await asyncio.sleep(0.2)
            continue
        try:
            writer.write(json.dumps({"model": model}).encode() + b"\n")
            read = asyncio.ensure_future(reader.readline())
            await asyncio.wait((read, gone), timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                if gone.done():
                    return {"ok": False, "status": 499, "code": "client_closed",
                            "message": "client closed the request while its model was loading"}
                return {"ok": False, "status": 503, "code": "model_not_ready", "retry_after": 5,
                        "message": f"model {model!r} was not loaded in time (server.load_timeout_s)"}
            line = read.result()
        except OSError:
            line = b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if line:
            answer: dict[str, Any] = json.loads(line)
            return answer
        # The manager went away (restarted by a reload): ask the new one.
        unreachable_since = None
        await asyncio.sleep(0.1)
