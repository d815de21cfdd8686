"""Metric updates are added up and written once per event-loop iteration: the result must be what prometheus-client's
own inc() and observe() would have written, bucket by bucket."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram

from appliance.metrics import proxy as metrics

BUCKETS = (0.1, 1.0, 10.0)


def test_one_flush_per_iteration_writes_what_inc_and_observe_would() -> None:
    registry = CollectorRegistry()
    added = Histogram("pending_h", "h", ["route"], buckets=BUCKETS, registry=registry)
    direct = Histogram("direct_h", "h", ["route"], buckets=BUCKETS, registry=registry)
    counter = Counter("pending_c", "c", ["route"], registry=registry)
    values = [0.05, 0.1, 0.1000001, 0.5, 1.0, 3.0, 10.0, 11.0, 0.0]

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"route": "/r", **labels})

    async def main() -> None:
        for v in values:
            metrics.observe(added, v, "/r")
            direct.labels("/r").observe(v)
        metrics.add(counter, 2, "/r")
        metrics.add(counter, 3, "/r")
        # Nothing is written until the loop runs the flush it scheduled.
        assert sample("pending_c_total") in (None, 0.0)
        assert sample("pending_h_count") in (None, 0.0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert sample("pending_c_total") == 5
    for le in ("0.1", "1.0", "10.0", "+Inf"):
        assert sample("pending_h_bucket", le=le) == sample("direct_h_bucket", le=le), le
    assert sample("pending_h_count") == len(values)
    assert sample("pending_h_sum") == sample("direct_h_sum")
