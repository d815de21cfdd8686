from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Proxy, free_port, stub_config, write_config
from tests.stub_llama import StubLlama


@pytest.fixture(scope="module")
def stubs() -> Iterator[tuple[StubLlama, StubLlama]]:
    chat, embed = StubLlama(free_port()), StubLlama(free_port())
    chat.start()
    embed.start()
    yield chat, embed
    chat.stop()
    embed.stop()


@pytest.fixture(scope="module")
def rerank_stub() -> Iterator[StubLlama]:
    """A third stub, for a rerank model."""
    stub = StubLlama(free_port())
    stub.start()
    yield stub
    stub.stop()


@pytest.fixture()
def chat_stub(stubs: tuple[StubLlama, StubLlama]) -> StubLlama:
    stubs[0].received.clear()
    stubs[0].dropped = 0
    stubs[0].health_checks.clear()
    stubs[0].health_status = 200
    return stubs[0]


@pytest.fixture(scope="module")
def proxy(stubs: tuple[StubLlama, StubLlama], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp: Path = tmp_path_factory.mktemp("proxy")
    doc = stub_config(tmp, stubs[0].port, stubs[1].port, body_limit_bytes=4096, request_timeout_s=1.5)
    p = Proxy(write_config(tmp / "appliance.toml", doc), doc["server"]["port"]).start()
    yield p
    p.stop()
