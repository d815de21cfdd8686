"""Two on-demand models that cannot share memory, both busy at once: they take turns of at least min_residency_s.

Without turns they would swap on every request (or, with a model that never goes idle, the other would starve); a
model that is closing while requests for it already wait must still be unloaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Appliance, serving
from tests.e2e.test_on_demand import ask, events, model

pytestmark = pytest.mark.timeout(240)
RESIDENCY_S = 3.0
SECONDS = 16.0


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("on_demand_turns")
    sections = {"memory": {"CPU": 500}, "server": {"load_timeout_s": 60, "min_residency_s": RESIDENCY_S}}
    with serving(tmp, [model("t-a"), model("t-b")], sections) as app:
        yield app


def test_two_busy_models_take_turns_and_neither_starves(app: Appliance) -> None:
    answers: dict[str, list[int]] = {"t-a": [], "t-b": []}
    deadline = time.monotonic() + SECONDS

    def client(name: str) -> None:
        while time.monotonic() < deadline:
            answers[name].append(ask(app, name, max_tokens=8).status_code)

    clients = [threading.Thread(target=client, args=(name,)) for name in ("t-a", "t-b", "t-a", "t-b")]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    assert set(answers["t-a"]) == {200} and set(answers["t-b"]) == {200}, answers
    assert len(answers["t-a"]) >= 4 and len(answers["t-b"]) >= 4  # neither starved
    loads = [e for e in events(app, "model_loaded") if e["model"] in answers]
    # One load per turn: at most one turn per residency (plus the first of each), never one per request.
    assert 3 <= len(loads) <= SECONDS / RESIDENCY_S + 3, [e["model"] for e in loads]
    assert len(loads) < (len(answers["t-a"]) + len(answers["t-b"])) / 2
    evicted = [e for e in events(app, "model_unloaded") if e["model"] in answers]
    assert all(e["reason"] == "evicted" for e in evicted)
