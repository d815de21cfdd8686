"""The admission queue: a busy model's slots go round-robin across clients, weighted, across workers.

Two ``FairShare`` objects with two worker slots stand for two workers (their wake-ups go through the real FIFOs); the
arbiter's clean-up of a dead worker is the function gunicorn's hook calls.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.shared import admission
from appliance.shared.admission import FairShare, Ticket


def workers(tmp: Path, parallel: int = 1, n: int = 2) -> list[FairShare]:
    admission.reset(tmp)
    out = [FairShare(tmp, {"m": parallel}, lambda i=i: i, lambda: n) for i in range(n)]  # type: ignore[misc]
    for w in out:
        w.start()
    return out


async def order_of(fs: list[FairShare], plan: list[tuple[int, str, float]], held: int = 1) -> list[str]:
    """Requests ``(worker, client, weight)`` queued behind ``held`` running ones; the clients in the order they get
    the slot (each leaves at once)."""
    running = [fs[0].enter("m", "first", 1.0) for _ in range(held)]
    assert all(t.ready is None for t in running)
    tickets = [(fs[w].enter("m", client, weight), w, client) for w, client, weight in plan]
    assert all(t.ready is not None for t, _, _ in tickets)
    served: list[str] = []

    async def one(t: Ticket, w: int, client: str) -> None:
        gone = asyncio.get_running_loop().create_future()
        assert await fs[w].wait(t, gone)
        served.append(client)
        await asyncio.sleep(0.01)
        fs[w].leave(t)

    tasks = [asyncio.create_task(one(t, w, c)) for t, w, c in tickets]
    await asyncio.sleep(0.05)
    for t in running:
        fs[0].leave(t)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    return served


def test_a_flood_does_not_delay_a_single_request_behind_it(tmp_path: Path) -> None:
    async def main() -> list[str]:
        fs = workers(tmp_path)
        return await order_of(fs, [(0, "flood", 1.0)] * 20 + [(1, "single", 1.0)])

    served = asyncio.run(main())
    assert served.index("single") <= 1, served  # after at most one of the flood, not twenty


def test_weights_share_the_slots_in_proportion(tmp_path: Path) -> None:
    async def main() -> list[str]:
        fs = workers(tmp_path)
        return await order_of(fs, [(0, "heavy", 3.0)] * 12 + [(1, "light", 1.0)] * 12)

    served = asyncio.run(main())
    first = served[:16]
    assert first.count("heavy") == 12 and first.count("light") == 4, served


def test_two_slots_and_requests_that_give_up_their_place(tmp_path: Path) -> None:
    async def main() -> None:
        fs = workers(tmp_path, parallel=2)
        a, b = fs[0].enter("m", "x", 1), fs[1].enter("m", "y", 1)
        assert a.ready is None and b.ready is None  # two slots: both run at once
        waiting = fs[1].enter("m", "z", 1)
        gone = asyncio.get_running_loop().create_future()
        gone.set_result(None)  # the client left
        assert not await fs[1].wait(waiting, gone)
        fs[1].leave(waiting)
        assert admission.waiting(tmp_path, ["m"]) == {"m": 0}
        later = fs[1].enter("m", "z", 1)
        fs[0].leave(a)  # frees a slot: granted to the request waiting in the other worker, woken through its FIFO
        never = asyncio.get_running_loop().create_future()
        assert await asyncio.wait_for(fs[1].wait(later, never), 2)
        assert later.waited_s < admission.RECHECK_S  # the wake-up, not the periodic look
        fs[1].leave(later)
        fs[1].leave(b)
        assert fs[0].enter("m", "x", 1).ready is None

    asyncio.run(main())


def test_a_dead_workers_slots_and_places_go_to_the_others(tmp_path: Path) -> None:
    async def main() -> None:
        fs = workers(tmp_path)
        held = fs[1].enter("m", "x", 1)
        assert held.ready is None
        fs[1].enter("m", "y", 1)  # worker 1 also has a request waiting; then it dies
        waiting = fs[0].enter("m", "z", 1)
        fs[1].stop()
        admission.release_dead(tmp_path, 1, {"m": 1})
        never = asyncio.get_running_loop().create_future()
        assert await asyncio.wait_for(fs[0].wait(waiting, never), 2)
        assert admission.waiting(tmp_path, ["m"]) == {"m": 0}

    asyncio.run(main())


@pytest.mark.parametrize("weight", [0.001, 1000.0])
def test_extreme_weights_keep_integer_tags(tmp_path: Path, weight: float) -> None:
    async def main() -> list[str]:
        fs = workers(tmp_path)
        return await order_of(fs, [(0, "a", weight)] * 3 + [(1, "b", 1.0)] * 3)

    assert sorted(asyncio.run(main())) == ["a"] * 3 + ["b"] * 3
