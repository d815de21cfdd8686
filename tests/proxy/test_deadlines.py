"""The one timer behind server.request_timeout_s: waits past their deadline are cancelled, the others never."""

from __future__ import annotations

import asyncio

from appliance.proxy.runtime import Deadlines


def test_only_waits_past_their_deadline_are_cancelled() -> None:
    async def main() -> None:
        deadlines = Deadlines()
        outcome: dict[str, str] = {}

        async def wait(name: str, after_s: float, work_s: float) -> None:
            task = asyncio.current_task()
            assert task is not None
            deadlines.add(task, after_s)
            try:
                await asyncio.sleep(work_s)
                outcome[name] = "done"
            except asyncio.CancelledError:
                outcome[name] = "cancelled"
            finally:
                deadlines.discard(task)

        await asyncio.gather(wait("slow", 0.2, 5), wait("quick", 0.3, 0.05), wait("late", 0.4, 0.35),
                             wait("later", 0.5, 5))
        assert outcome == {"slow": "cancelled", "quick": "done", "late": "done", "later": "cancelled"}
        assert deadlines._timer is None  # nothing left to wait for: no timer wakes the worker

    asyncio.run(asyncio.wait_for(main(), 5))
