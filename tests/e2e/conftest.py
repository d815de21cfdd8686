"""A real appliance: `appliance up` with the real llama-server and Gemma 3 270M, as the README's setup installs them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import REPO, free_port, write_config

BINARY = Path(os.environ.get("APPLIANCE_LLAMA_SERVER", REPO / ".appliance" / "bin" / "llama-server"))
MODELS = Path(os.environ.get("APPLIANCE_MODELS_DIR", REPO / ".appliance" / "models"))
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


@dataclass
class Appliance:
    config: Path
    doc: dict[str, Any]
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    health_seen: list[int] = field(default_factory=list)

    def supervisorctl(self, *args: str) -> str:
        conf = Path(self.doc["supervision"]["runtime_dir"]) / "supervisord.conf"
        r = subprocess.run([str(Path(sys.executable).with_name("supervisorctl")), "-c", str(conf), *args],
                           capture_output=True, text=True, timeout=60)
        return r.stdout

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.supervisorctl("status").splitlines():
            parts = line.split()
            if "pid" in parts:
                out[parts[0]] = int(parts[parts.index("pid") + 1].rstrip(","))
        return out

    def model_port(self, name: str) -> int:
        port: int = next(m["port"] for m in self.doc["models"] if m["name"] == name)
        return port

    def wait_health(self, want: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"appliance up exited:\n{self.log.read_text()[-4000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                self.health_seen.append(r.status_code)
                if r.status_code == want:
                    doc: dict[str, Any] = r.json()
                    return doc
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"/health never returned {want}:\n{self.log.read_text()[-4000:]}")

    def wait_running(self, timeout: float = 60) -> None:
        """Until supervisord calls every program RUNNING (models only after stable_uptime_s), on-demand models
        aside (the model manager starts them)."""
        on_demand = {"model-" + m["name"] for m in self.doc["models"] if m.get("load") == "on_demand"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in self.supervisorctl("status").splitlines() if line.split()[0] not in on_demand]
            if lines and all(line.split()[1] == "RUNNING" for line in lines):
                return
            time.sleep(0.25)
        raise TimeoutError(self.supervisorctl("status"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_appliance(tmp: Path, models: list[dict[str, Any]], sections: dict[str, dict[str, Any]] | None = None,
                    **supervision: Any) -> Appliance:
    """`appliance up` on a config for ``models``; ``sections`` are merged over the defaults (``{"events": {...}}``)."""
    if not BINARY.is_file() or not (MODELS / MODEL_FILE).is_file():
        pytest.fail(f"{BINARY} or {MODELS / MODEL_FILE} missing: run scripts/setup.sh first (the README's command)")
    doc: dict[str, Any] = {
        "server": {"bind": ["127.0.0.1"], "port": free_port(), "workers": 2, "graceful_timeout_s": 10},
        "metrics": {"port": free_port()},
        "llama_server": {"binary": str(BINARY), "allowed_binary_prefixes": [str(BINARY.parent)],
                         "models_dir": str(tmp / "models")},
        "supervision": {"runtime_dir": str(tmp / "run"), "state_dir": str(tmp / "state"), "max_restarts": 3,
                        "stable_uptime_s": 5, "backoff_initial_s": 0.5, "backoff_max_s": 2.0, **supervision},
        "models": models,
    }
    for name, values in (sections or {}).items():
        doc[name] = {**doc.get(name, {}), **values}
    (tmp / "models").mkdir(exist_ok=True)
    # Validation follows symlinks, so the file itself must lie under this models_dir: hard-link it (or copy).
    target = tmp / "models" / MODEL_FILE
    if not target.exists():
        try:
            os.link((MODELS / MODEL_FILE).resolve(), target)
        except OSError:
            shutil.copyfile(MODELS / MODEL_FILE, target)
    config = write_config(tmp / "appliance.toml", doc)
    log = tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "up", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    return Appliance(config, doc, f"http://127.0.0.1:{doc['server']['port']}", proc, log)


@contextlib.contextmanager
def serving(tmp: Path, models: list[dict[str, Any]], sections: dict[str, dict[str, Any]] | None = None,
            **supervision: Any) -> Iterator[Appliance]:
    """``start_appliance``, then until every model serves and supervisord calls every program RUNNING; stopped at the
    end."""
    app = start_appliance(tmp, models, sections, **supervision)
    try:
        app.wait_health(200)
        app.wait_running()
        yield app
    finally:
        app.stop()


def chat_model(port: int, name: str = "gemma-3-270m") -> dict[str, Any]:
    return {"name": name, "file": MODEL_FILE, "kind": "chat", "port": port, "ctx_size": 2048, "threads": 1,
            "parallel": 2}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("appliance")
    models = [chat_model(free_port()),
              {"name": "gemma-3-270m-embed", "file": MODEL_FILE, "kind": "embed", "pooling": "mean",
               "port": free_port(), "ctx_size": 1024, "threads": 1, "parallel": 1}]
    with serving(tmp, models) as app:
        yield app
