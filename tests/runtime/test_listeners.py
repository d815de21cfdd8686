"""Which workers still accept on the proxy's port, and `appliance reload` waiting for the replaced ones to stop.

A small pre-fork server stands in for gunicorn's arbiter: it listens, forks two workers that inherit the socket, and on
SIGHUP forks two new ones and sends the old ones SIGTERM. An old worker then closes its copy of the socket but stays
alive, as a retiring proxy worker does while it finishes a stream.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.config import parse
from appliance.runtime import listeners, reload
from tests.config.test_config import base_doc, tree  # noqa: F401  (fixture)
from tests.helpers import free_port

ARBITER = r"""
import os, signal, socket, sys, time
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))

def retire(*_):
    listener.close()

def worker():
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, retire)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for _ in range(120):
            time.sleep(1)
        os._exit(0)
    return pid

workers = [worker(), worker()]

def replace(*_):
    global workers
    old, workers = workers, [worker(), worker()]
    for pid in old:
        os.kill(pid, signal.SIGTERM)

signal.signal(signal.SIGHUP, replace if sys.argv[2] == "replaces" else signal.SIG_IGN)
print("ready", flush=True)
for _ in range(120):
    time.sleep(1)
"""


@dataclass
class Arbiter:
    pid: int
    port: int  # where it listens (0: nowhere)


def start_arbiter(on_hup: str) -> Iterator[Arbiter]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", ARBITER, str(port), on_hup], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield Arbiter(proc.pid, port)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture()
def arbiter() -> Iterator[Arbiter]:
    yield from start_arbiter("replaces")


@pytest.fixture()
def stuck_arbiter() -> Iterator[Arbiter]:
    yield from start_arbiter("ignores")


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def accepting(arbiter: Arbiter) -> set[int]:
    return listeners.holders(listeners.children(arbiter.pid), listeners.listening_sockets(arbiter.pid))


def test_listening_sockets_are_those_the_process_listens_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        found = listeners.listening_sockets(os.getpid())
        inode = os.fstat(server.fileno()).st_ino
        assert inode in found
        assert os.fstat(client.fileno()).st_ino not in found  # connected, not listening
    assert inode not in listeners.listening_sockets(os.getpid())  # closed


def test_workers_count_as_accepting_until_they_close_the_socket(arbiter: Arbiter) -> None:
    workers = accepting(arbiter)
    assert len(workers) == 2 and workers == listeners.children(arbiter.pid)
    first = min(workers)
    os.kill(first, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while first in accepting(arbiter) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accepting(arbiter) == workers - {first}
    assert alive(first)  # it still runs: only its socket is gone


class FakeSupervisor:
    """The two supervisord calls the proxy switch makes, acting on the real stand-in arbiter."""

    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter

    def getProcessInfo(self, name: str) -> dict[str, Any]:
        assert name == "proxy"
        return {"pid": self.arbiter.pid}

    def signalProcess(self, name: str, sig: str) -> bool:
        assert (name, sig) == ("proxy", "HUP")
        os.kill(self.arbiter.pid, signal.SIGHUP)
        return True


class FakeRpc:
    def __init__(self, arbiter: Arbiter) -> None:
        self.supervisor = FakeSupervisor(arbiter)


def switch(arbiter: Arbiter, tree: Path) -> reload.ReloadReport:  # noqa: F811
    report = reload.ReloadReport()
    reload._replace_proxy_workers(FakeRpc(arbiter), parse(base_doc(tree), tree), report)
    return report


def test_reload_returns_once_the_old_workers_stopped_accepting(arbiter: Arbiter, tree: Path) -> None:  # noqa: F811
    old = accepting(arbiter)
    assert len(old) == 2
    report = switch(arbiter, tree)
    assert report.failure is None and report.proxy_switch_seen is True
    assert report.lines() == ["replaced the proxy workers (in-flight requests finish on the old ones)"]
    now = accepting(arbiter)
    assert len(now) == 2 and not now & old
    assert all(alive(pid) for pid in old)


def test_reload_fails_when_the_old_workers_keep_accepting(stuck_arbiter: Arbiter, tree: Path,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reload, "SWITCH_TIMEOUT_S", 0.5)
    old = accepting(stuck_arbiter)
    assert len(old) == 2
    report = switch(stuck_arbiter, tree)
    assert report.proxy_switch_seen is False and report.failure is not None
    assert f"the proxy workers {', '.join(map(str, sorted(old)))} still accept connections 0.5 s after SIGHUP" \
        in report.failure
    assert "proxy.log" in report.failure
    assert report.lines() == []  # not "nothing changed": the SIGHUP was sent


def test_reload_says_when_it_could_not_check_the_switch(tree: Path) -> None:  # noqa: F811
    # A proxy whose listening socket /proc does not show (here: a process that listens on nothing).
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        try:
            report = switch(Arbiter(proc.pid, 0), tree)
        finally:
            proc.kill()
    assert report.failure is None and report.proxy_switch_seen is None
    assert report.lines() == ["replaced the proxy workers (in-flight requests finish on the old ones); could not see "
                              "its listening socket in /proc to confirm that the old ones stopped accepting"]
