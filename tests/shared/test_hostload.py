"""The shared in-flight counters: what workers write and what the exporter reads."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.shared import hostload
from appliance.shared.hostload import HostLoad


def test_the_reader_creates_nothing_and_reads_zero_before_any_worker(tmp_path: Path) -> None:
    directory = tmp_path / "inflight"
    hostload.reset(directory)
    assert hostload.in_flight(directory, ["m"]) == {"m": 0}
    assert list(directory.iterdir()) == []


def test_requests_count_while_in_flight_and_a_dead_workers_do_not(tmp_path: Path) -> None:
    directory = tmp_path / "inflight"
    hostload.reset(directory)
    load = HostLoad(directory, ["m", "n"])
    load.start()
    assert load.try_enter("m", 3)
    pid = os.fork()
    if pid == 0:  # another worker: admits two requests and dies with them in flight
        other = HostLoad(directory, ["m", "n"])
        other.start()
        os._exit(0 if other.try_enter("m", 10) and other.try_enter("m", 10) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert hostload.in_flight(directory, ["m", "n"]) == {"m": 1, "n": 0}  # the dead worker's two are not counted
    assert not load.try_enter("m", 3)  # the bound counts them until the arbiter releases the dead worker's slot
    hostload.release_dead(directory, pid)
    assert load.try_enter("m", 3)
    assert hostload.in_flight(directory, ["m"]) == {"m": 2}
    load.leave("m")
    load.leave("m")
    assert hostload.in_flight(directory, ["m", "n"]) == {"m": 0, "n": 0}
