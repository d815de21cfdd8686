"""A limited client's request path, compiled: one call admits and counts a request and renders its rate-limit fields
exactly as OpenAI's and Anthropic's SDKs read them; its admission ends once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.policy._requestpath import BUSY, FULL, Admission, Client, Limits, RateFields
from appliance.policy.windows import Window

T0 = 1_800_000_000.0  # a whole second, 2027-01-15T08:00:00Z


def client(tmp: Path, concurrent: int = 0, requests: int = 0, tokens: int = 0, day: int = 0) -> Client:
    c = Client("team", concurrent, requests, tokens, day)
    c.window = Window(tmp / "c.win", 0, lambda: 1, lambda: 0)
    return c


def admitted(c: Client, now: float, anthropic: bool = False) -> Admission:
    a = c.enter(now, anthropic)
    assert isinstance(a, Admission), a
    return a


def test_openais_fields_count_down_with_each_request_and_token(tmp_path: Path) -> None:
    c = client(tmp_path, requests=3, tokens=100)
    assert admitted(c, T0).head == (b"x-ratelimit-limit-requests: 3\r\nx-ratelimit-remaining-requests: 2\r\n"
                                    b"x-ratelimit-reset-requests: 1m0s\r\nx-ratelimit-limit-tokens: 100\r\n"
                                    b"x-ratelimit-remaining-tokens: 100\r\nx-ratelimit-reset-tokens: 0s\r\n")
    c.charge(30, T0 + 0.5)
    head = admitted(c, T0 + 10.2).head
    # The tokens' window is whole again when T0's second leaves it: 49.8 s from now, rounded up.
    assert b"x-ratelimit-remaining-requests: 1\r\n" in head
    assert b"x-ratelimit-remaining-tokens: 70\r\nx-ratelimit-reset-tokens: 50s\r\n" in head
    assert b"x-ratelimit-remaining-requests: 0\r\n" in admitted(c, T0 + 11).head
    assert c.enter(T0 + 12, False) == FULL


def test_only_the_limits_a_client_has_get_fields(tmp_path: Path) -> None:
    assert admitted(client(tmp_path / "r", requests=10**10), T0).head == (
        b"x-ratelimit-limit-requests: 10000000000\r\nx-ratelimit-remaining-requests: 9999999999\r\n"
        b"x-ratelimit-reset-requests: 1m0s\r\n")
    assert admitted(client(tmp_path / "t", tokens=10**12), T0).head == (
        b"x-ratelimit-limit-tokens: 1000000000000\r\nx-ratelimit-remaining-tokens: 1000000000000\r\n"
        b"x-ratelimit-reset-tokens: 0s\r\n")
    assert admitted(client(tmp_path / "c", concurrent=2, day=1000), T0).head == b""


def test_anthropics_fields_give_times(tmp_path: Path) -> None:
    c = client(tmp_path, requests=2, tokens=50)
    c.charge(5, T0)
    assert admitted(c, T0 + 0.3, anthropic=True).head == (
        b"anthropic-ratelimit-requests-limit: 2\r\nanthropic-ratelimit-requests-remaining: 1\r\n"
        b"anthropic-ratelimit-requests-reset: 2027-01-15T08:01:00Z\r\nanthropic-ratelimit-tokens-limit: 50\r\n"
        b"anthropic-ratelimit-tokens-remaining: 45\r\nanthropic-ratelimit-tokens-reset: 2027-01-15T08:01:00Z\r\n")


def test_an_admission_ends_once_and_an_undone_one_does_not_count(tmp_path: Path) -> None:
    c = client(tmp_path, concurrent=1, requests=2)
    a = admitted(c, T0)
    assert c.enter(T0, False) == BUSY
    a.leave()
    a.leave()  # the second does nothing: the other request in flight below still counts
    b = admitted(c, T0)
    assert c.enter(T0, False) == BUSY
    b.undo()  # refused after all (the model's queue was full): neither in flight nor in the window
    b.leave()
    assert b"x-ratelimit-remaining-requests: 0\r\n" in admitted(c, T0).head


def test_a_client_without_its_file_is_an_error_not_a_crash() -> None:
    with pytest.raises(RuntimeError, match=r"clients\.team: its windows file is not mapped"):
        Client("team", 1, 0, 0, 0).enter(T0, False)


def test_a_refusals_fields_say_when_the_window_has_room_again() -> None:
    # A refused request's window is full: what is left is 0, and the reset is when the oldest seconds leave it.
    fields = RateFields(3, 0, False)
    assert fields.render(3, T0 + 42.5, 0, T0, T0) == (b"x-ratelimit-limit-requests: 3\r\n"
                                                      b"x-ratelimit-remaining-requests: 0\r\n"
                                                      b"x-ratelimit-reset-requests: 43s\r\n")
    assert b"x-ratelimit-remaining-tokens: 0\r\nx-ratelimit-reset-tokens: 1m30s\r\n" in RateFields(0, 10, False).render(
        0, T0, 12, T0 + 90, T0)
    assert RateFields(0, 10, True).render(0, T0, 4, T0 + 90, T0) == (
        b"anthropic-ratelimit-tokens-limit: 10\r\nanthropic-ratelimit-tokens-remaining: 6\r\n"
        b"anthropic-ratelimit-tokens-reset: 2027-01-15T08:01:30Z\r\n")


def test_the_request_paths_one_call_finds_the_client_and_hands_refusals_to_the_gate(tmp_path: Path) -> None:
    refused: list[tuple[str, int, float, bool]] = []

    def refuse(name: str, code: int, now: float, anthropic: bool) -> str:
        refused.append((name, code, now, anthropic))
        return "refused"

    team = client(tmp_path, concurrent=1, tokens=100)
    limits = Limits({"team": team}, refuse)
    assert limits.enter("someone", False) is None  # no limits: nothing counted, no fields
    before = time.time()
    a = limits.enter("team", False)
    assert isinstance(a, Admission) and before <= a.at <= time.time()
    assert limits.enter("team", True) == "refused"
    (name, code, at, anthropic), = refused
    assert (name, code, anthropic) == ("team", BUSY, True) and a.at <= at <= time.time()
    a.leave()
    limits.charge("team", 40)
    limits.charge("someone", 40)  # no limits: nothing to count
    b = limits.enter("team", False)
    assert isinstance(b, Admission) and b"x-ratelimit-remaining-tokens: 60\r\n" in b.head
    b.leave()
    limits.charge("team", 60)
    assert limits.enter("team", False) == "refused" and refused[-1][:2] == ("team", FULL)
