"""A response's head and body leave in one write; nothing is reordered or lost around it."""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.proxy.protocol import CoalescedTransport


class Recorder:
    """A transport that records the system calls it would make."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.calls.append(("writelines", b"".join(parts)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_head_and_body_in_one_write_and_a_lone_head_by_the_end_of_the_iteration() -> None:
    async def main() -> list[tuple[str, Any]]:
        t = Recorder()
        out = CoalescedTransport(t, asyncio.get_running_loop())  # type: ignore[arg-type]
        out.hold_next = True
        out.write(b"HEAD1")
        out.write(b"BODY1")  # a complete response: one call
        out.write(b"MORE1")  # later writes go straight through
        out.hold_next = True
        out.write(b"HEAD2")  # a stream's head: its first event is not there yet
        assert t.calls[-1] == ("write", b"MORE1")
        await asyncio.sleep(0)
        out.write(b"EVENT2")
        out.hold_next = True
        out.write(b"HEAD3")
        out.close()  # what is held goes out before the connection closes
        assert out.get_extra_info("peername") == "info:peername"
        assert out.is_closing()
        return t.calls

    assert asyncio.run(main()) == [("writelines", b"HEAD1BODY1"), ("write", b"MORE1"), ("write", b"HEAD2"),
                                   ("write", b"EVENT2"), ("write", b"HEAD3"), ("close", None)]


def test_head_fields_go_into_the_next_head_only() -> None:
    async def main() -> list[tuple[str, Any]]:
        t = Recorder()
        out = CoalescedTransport(t, asyncio.get_running_loop())  # type: ignore[arg-type]
        out.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # written while the app reads the body: before it sets fields
        out.head_fields = b"x-ratelimit-remaining-requests: 9\r\n"
        out.hold_next = True
        out.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        out.write(b"{}")
        out.hold_next = True
        out.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")  # the next response: no fields of its own
        out.write(b"[]")
        return t.calls

    assert asyncio.run(main()) == [
        ("write", b"HTTP/1.1 100 Continue\r\n\r\n"),
        ("writelines", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-ratelimit-remaining-requests: 9\r\n\r\n{}"),
        ("writelines", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]"),
    ]
