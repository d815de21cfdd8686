"""`appliance reload`'s proxy switch against a real gunicorn arbiter: it returns once the replaced workers stopped
accepting, so every connection opened after it gets the new settings; and it says so when they never do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.config import ApplianceConfig, load
from appliance.proxy import retire
from appliance.runtime import reload
from tests.helpers import Proxy, free_port, proxy_over_stubs, stream_under_way, stub_config, write_config


class FakeSupervisor:
    """The supervisord call the switch makes, acting on a real process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def signalProcess(self, name: str, sig: str) -> bool:
        assert (name, sig) == ("proxy", "HUP")
        os.kill(self.pid, signal.SIGHUP)
        return True


class FakeRpc:
    def __init__(self, pid: int) -> None:
        self.supervisor = FakeSupervisor(pid)


@pytest.fixture()
def keyed(tmp_path: Path) -> Iterator[tuple[Proxy, Path, Path]]:
    """A proxy (2 workers, API key sk-old) in front of stub models; yields it, its config and its keys file."""
    keys = tmp_path / "keys"
    keys.write_text("sk-old\n")
    with proxy_over_stubs(tmp_path, api_keys_file=str(keys), graceful_timeout_s=20) as (p, _, config):
        yield p, config, keys


def status(url: str, key: str) -> int:
    """One request on a connection of its own."""
    with httpx.Client() as fresh:
        return fresh.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def switch(pid: int, cfg: ApplianceConfig, said: list[str] | None = None) -> reload.ReloadReport:
    report = reload.ReloadReport()
    reload._replace_proxy_workers(FakeRpc(pid), cfg, report, (said if said is not None else []).append)
    return report


OLD_KEY = {"Authorization": "Bearer sk-old"}


def test_every_connection_after_the_reload_gets_the_new_settings(keyed: tuple[Proxy, Path, Path]) -> None:
    p, config, keys = keyed
    assert p.proc is not None and status(p.url, "sk-old") == 200
    # A stream under way keeps one old worker alive (retiring) well after the switch.
    t, received = stream_under_way(p, 12, OLD_KEY)  # 3 s
    try:
        keys.write_text("sk-new\n")
        report = switch(p.proc.pid, load(config, check_files=False))
        assert report.failure is None and report.proxy_workers_replaced
        assert [status(p.url, "sk-new") for _ in range(20)] == [200] * 20
        assert [status(p.url, "sk-old") for _ in range(20)] == [401] * 20
        old = retire.marked(retire.retiring_file(load(config, check_files=False)))
        assert old is not None and len(old) == 2
    finally:
        t.join(30)
    assert b"".join(received).endswith(b"data: [DONE]\n\n")  # finished by its retiring worker


def test_a_reload_right_after_another_waits_for_the_arbiter(keyed: tuple[Proxy, Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # After the first switch the arbiter waits for the old worker's stream (up to graceful_timeout_s, 20 s here)
    # before it handles the second SIGHUP. The second reload must wait for it, say why, and still succeed.
    monkeypatch.setattr(reload, "SWITCH_MARGIN_S", 1.0)
    monkeypatch.setattr(reload, "SWITCH_SAY_AFTER_S", 0.5)
    p, config, keys = keyed
    assert p.proc is not None
    t, received = stream_under_way(p, 16, OLD_KEY)  # 4 s
    try:
        keys.write_text("sk-second\n")
        assert switch(p.proc.pid, load(config, check_files=False)).proxy_workers_replaced
        keys.write_text("sk-third\n")
        said: list[str] = []
        began = time.monotonic()
        report = switch(p.proc.pid, load(config, check_files=False), said)
        waited = time.monotonic() - began
        assert report.failure is None and report.proxy_workers_replaced, report.failure
        assert [status(p.url, "sk-third") for _ in range(10)] == [200] * 10
        assert [status(p.url, "sk-second") for _ in range(10)] == [401] * 10
    finally:
        t.join(30)
    assert b"".join(received).endswith(b"data: [DONE]\n\n")
    print(f"second reload waited {waited:.2f} s")
    assert waited > 1.0  # longer than the margin alone: it waited for the arbiter
    assert said == ["waiting for the proxy to replace its workers: after a reload it lets the old workers finish their "
                    "streams before it takes the next one (server.graceful_timeout_s, 20 s at most)"]


@pytest.fixture()
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ApplianceConfig:
    """A config whose runtime_dir exists, with a switch timeout of 1 s (graceful_timeout_s, no margin)."""
    monkeypatch.setattr(reload, "SWITCH_MARGIN_S", 0.0)
    doc = stub_config(tmp_path, free_port(), free_port(), graceful_timeout_s=1)
    cfg = load(write_config(tmp_path / "appliance.toml", doc), check_files=False)
    Path(cfg.supervision.runtime_dir).mkdir(parents=True)
    return cfg


def started(argv: list[str]) -> subprocess.Popen[bytes]:
    """A Python process that prints a line once it is ready."""
    proc = subprocess.Popen([sys.executable, "-c", *argv], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def test_the_reload_fails_when_the_proxy_does_not_replace_its_workers(cfg: ApplianceConfig) -> None:
    # A proxy whose config no longer loads keeps its old workers. Here: a process that ignores SIGHUP altogether.
    with started(["import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); print(flush=True); "
                  "time.sleep(30)"]) as proc:
        try:
            report = switch(proc.pid, cfg)
        finally:
            proc.kill()
    assert not report.proxy_workers_replaced
    assert report.failure == (f"the proxy did not start replacing its workers 1 s after SIGHUP: it still serves the "
                              f"old settings; see {cfg.log_dir}/proxy.log")
    assert report.lines() == []  # not "nothing changed": the SIGHUP was sent


def test_the_reload_names_old_workers_that_keep_accepting(cfg: ApplianceConfig) -> None:
    # The arbiter marked two workers; one said it stopped accepting, one did not, and both still run.
    workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in range(2)]
    retire.acknowledge(retire.retired_file(cfg), workers[0].pid)
    marks = (f"import signal, time\nfrom pathlib import Path\nfrom appliance.proxy import retire\n"
             f"signal.signal(signal.SIGHUP, lambda *_: retire.mark(Path({str(retire.retiring_file(cfg))!r}), "
             f"[{workers[0].pid}, {workers[1].pid}]))\nprint(flush=True)\ntime.sleep(30)\n")
    with started([marks]) as arbiter:
        try:
            report = switch(arbiter.pid, cfg)
        finally:
            for proc in (arbiter, *workers):
                proc.kill()
                proc.wait()
    assert report.failure is not None and not report.proxy_workers_replaced
    assert report.failure.startswith(f"the proxy workers {workers[1].pid} still accept connections 1 s after SIGHUP")


def test_acknowledgements_of_exited_workers_are_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "proxy-retired"
    for pid in (11, 12, 13):
        retire.acknowledge(path, pid)
    retire.forget_acknowledged(path, lambda pid: pid != 12)
    assert retire.acknowledged(path) == {11, 13}
    retire.acknowledge(path, 14)
    assert path.read_text() == "11\n13\n14\n"
