"""Deployment tests: real `ansible-playbook` runs against Debian containers with systemd as PID 1 (tests/deploy/lab.py).

The hosts are offline; the controller is this machine, on the same bridge (198.18.0.1), so it is also the LAN client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.lab import Lab, ensure_image
from tests.helpers import REPO

ANSIBLE = REPO / "ansible"
VENV_BIN = REPO / ".venv" / "bin"
API_KEY = "sk-deploy-test"
_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


@pytest.fixture(scope="session")
def lab_image() -> Path:
    """The cached container base image (built on the first run on a machine, ~1 min)."""
    if os.geteuid() != 0:
        pytest.fail("the container lab needs root (systemd-nspawn, bridges, overlay mounts)")
    return ensure_image()


@dataclass
class PlayResult:
    rc: int
    output: str
    changed: dict[str, int]

    def ok(self) -> PlayResult:
        assert self.rc == 0, self.output[-6000:]
        return self


def base_vars(address: str) -> dict[str, Any]:
    """A LAN deployment of the default model, small enough for CI's two cores."""
    return {
        "appliance_apt_update_cache": False,
        "appliance_server_bind": [address],
        "appliance_server_workers": 2,
        "appliance_server_graceful_timeout_s": 30,
        "appliance_api_keys": [API_KEY],
        "appliance_models": [{"name": "gemma", "file": "gemma-3-270m-q4_k_m.gguf", "kind": "chat", "port": 11436,
                              "ctx_size": 1024, "threads": 1, "parallel": 2}],
        "appliance_supervision_stable_uptime_s": 3,
        "appliance_health_timeout_s": 120,
    }


class Deployment:
    """One lab and the variables of the current deployment; `play()` runs site.yml with them."""

    def __init__(self, lab: Lab, tmp: Path, hosts: list[str]) -> None:
        self.lab = lab
        self.tmp = tmp
        self.hosts = hosts
        self.inventory = lab.inventory({"gpu_hosts": hosts})
        self.vars: dict[str, Any] = base_vars(lab.address(hosts[0]))

    def play(self, *args: str, overrides: dict[str, Any] | None = None, timeout: float = 900) -> PlayResult:
        extra = self.tmp / "vars.json"
        extra.write_text(json.dumps({**self.vars, **(overrides or {})}))
        env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0"}
        r = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), "site.yml",
                            "-e", f"@{extra}", *args], cwd=ANSIBLE, env=env, capture_output=True, text=True,
                           timeout=timeout)
        out = r.stdout + r.stderr
        changed = {m[0]: int(m[2]) for m in _RECAP.findall(out)}
        return PlayResult(r.returncode, out, changed)

    def sh(self, cmd: str, host: str | None = None, check: bool = True) -> str:
        return self.lab.run(host or self.hosts[0], cmd, check=check).stdout

    def url(self, host: str | None = None) -> str:
        return f"http://{self.lab.address(host or self.hosts[0])}:8080"

    def pids(self, host: str | None = None) -> dict[str, int]:
        """supervisord's programs and their PIDs on the host, plus supervisord itself."""
        out = self.sh("/usr/local/bin/appliancectl status", host, check=False)
        pids = {p[0]: int(p[p.index("pid") + 1].rstrip(",")) for p in map(str.split, out.splitlines()) if "pid" in p}
        assert {"proxy", "exporter", "events"} <= pids.keys(), out
        pids["supervisord"] = int(self.sh("systemctl show -p MainPID --value appliance", host))
        return pids

    def wait_running(self, host: str | None = None, timeout: float = 120) -> None:
        """Until supervisord calls every program RUNNING (a model only after supervision.stable_uptime_s)."""
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = self.sh("/usr/local/bin/appliancectl status", host, check=False)
            if out.strip() and all(line.split()[1] == "RUNNING" for line in out.splitlines()):
                return
            time.sleep(0.5)
        raise TimeoutError(out)

    def wait_health(self, host: str | None = None, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url(host) + "/health", timeout=3)
                if r.status_code == 200:
                    doc: dict[str, Any] = r.json()
                    return doc
                last = r.text
            except httpx.HTTPError as e:
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"/health never answered 200: {last}")


@pytest.fixture(scope="module")
def lab(lab_image: Path) -> Iterator[Lab]:
    with Lab("deploy", {"node1": "198.18.0.11"}) as lb:
        yield lb


@pytest.fixture(scope="module")
def deployment(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    for path in (REPO / ".appliance/bin/llama-server", REPO / ".appliance/models/gemma-3-270m-q4_k_m.gguf"):
        if not path.is_file():
            pytest.fail(f"{path} is missing: run scripts/setup.sh first (the README's command)")
    return Deployment(lab, tmp_path_factory.mktemp("deploy"), ["node1"])
