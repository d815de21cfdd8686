"""Shared helpers: free ports, config files, and a real gunicorn proxy process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from appliance.runtime.supervisor_conf import GUNICORN_CONF
from tests.stub_llama import StubLlama

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return str(v)


def render_toml(doc: Mapping[str, Any]) -> str:
    out: list[str] = []
    for section, values in doc.items():
        if section == "models":
            for m in values:
                out.append("[[models]]")
                out += [f"{k} = {_toml_value(v)}" for k, v in m.items()]
        else:
            out.append(f"[{section}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def write_config(path: Path, doc: Mapping[str, Any]) -> Path:
    path.write_text(render_toml(doc))
    return path


def stub_config(tmp: Path, chat_port: int, embed_port: int, **server: Any) -> dict[str, Any]:
    """A config whose models are stub servers; files are not checked by the proxy (check_files=False)."""
    return {
        "server": {"bind": ["127.0.0.1"], "port": free_port(), "workers": 2, **server},
        "metrics": {"port": free_port()},
        "llama_server": {"binary": str(tmp / "bin/llama-server"), "allowed_binary_prefixes": [str(tmp / "bin")],
                         "models_dir": str(tmp / "models")},
        "supervision": {"runtime_dir": str(tmp / "run"), "state_dir": str(tmp / "state")},
        "models": [
            {"name": "chat-a", "aliases": ["gpt-4o-mini"], "file": "a.gguf", "kind": "chat", "port": chat_port},
            {"name": "embed-a", "file": "a.gguf", "kind": "embed", "port": embed_port},
        ],
    }


class Proxy:
    """gunicorn with the appliance's uvicorn workers, exactly as supervisord runs it."""

    def __init__(self, config_path: Path, port: int) -> None:
        self.config_path = config_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config_path.with_suffix(".log")

    def start(self, wait_ready: bool = True) -> Proxy:
        env = {**os.environ, "APPLIANCE_CONFIG": str(self.config_path)}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited: {self.log.read_text()}")
            try:
                r = httpx.get(self.url + "/health", timeout=1)
                if not wait_ready or r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"proxy did not become ready: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Exporter:
    """The metrics exporter process, as supervisord runs it."""

    def __init__(self, config_path: Path, port: int) -> None:
        self.config_path = config_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Exporter:
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.metrics.exporter", "--config",
                                      str(self.config_path)], cwd=REPO)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/metrics", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("exporter did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse an exposition with the official parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and want <= ls)


@contextlib.contextmanager
def proxy_over_stubs(tmp: Path, **server: Any) -> Iterator[tuple[Proxy, dict[str, Any], Path]]:
    """A proxy (``server`` settings over stub_config's) in front of a chat and an embeddings stub; yields it, its
    config document and the config's path."""
    chat, embed = StubLlama(free_port()), StubLlama(free_port())
    chat.start()
    embed.start()
    doc = stub_config(tmp, chat.port, embed.port, **server)
    config = write_config(tmp / "appliance.toml", doc)
    p = Proxy(config, doc["server"]["port"]).start()
    try:
        yield p, doc, config
    finally:
        p.stop()
        chat.stop()
        embed.stop()


def stream_under_way(p: Proxy, events: int, headers: Mapping[str, str] | None = None
                     ) -> tuple[threading.Thread, list[bytes]]:
    """A stub stream of ``events`` events 0.25 s apart, consumed in a thread; returns once its first bytes arrived."""
    received: list[bytes] = []

    def consume() -> None:
        body = json.dumps({"stub": "stream", "n": events, "delay": 0.25}).encode()
        with httpx.stream("POST", p.url + "/v1/chat/completions", content=body, headers=headers, timeout=60) as r:
            received.extend(r.iter_raw())

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.02)
    assert received, "the stream never started"
    return t, received
