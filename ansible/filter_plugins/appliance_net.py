"""Address checks for the appliance roles, with Python's ipaddress module (ansible.utils is not available offline).

The rules mirror ``appliance.config.load.check_bind_address`` so that a bad ``appliance_server_bind`` fails in the
preflight, before anything changes on a host, with the same reasons ``appliance check-config`` would give later.
"""

from __future__ import annotations

import ipaddress
import posixpath
from pathlib import PurePosixPath
from typing import Any

_Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> _Addr | None:
    try:
        addr = ipaddress.ip_address(str(text))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # ::ffff:a.b.c.d is a.b.c.d on dual-stack hosts
    return addr


def appliance_bind_problems(
    binds: list[str],
    host_addresses: list[str],
    keys_configured: bool,
    allow_unauthenticated_lan: bool,
) -> list[str]:
    """Why each bind address is unusable on this host; empty when all are fine.

    ``host_addresses``: the host's own addresses (facts omit loopback, which is always local).
    """
    own = {a for a in (_parse(h.split("%")[0]) for h in host_addresses) if a is not None}
    problems = []
    if not binds:
        problems.append("appliance_server_bind is empty: name at least one address")
    for text in binds:
        addr = _parse(text)
        if addr is None:
            problems.append(f"{text!r} is not a numeric IP address")
        elif addr.is_unspecified:
            problems.append(f"{text} listens on every interface; name the one address clients should use")
        elif addr == ipaddress.IPv4Address("255.255.255.255"):
            problems.append(f"{text} is the broadcast address")
        elif addr.is_multicast:
            problems.append(f"{text} is a multicast address")
        elif not addr.is_loopback and addr not in own:
            problems.append(f"{text} is not an address of this host (it has: {', '.join(sorted(map(str, own)))})")
        elif not addr.is_loopback and not keys_configured and not allow_unauthenticated_lan:
            problems.append(
                f"{text} is reachable from the network but appliance_api_keys is empty; set appliance_api_keys, "
                "or appliance_server_allow_unauthenticated_lan: true to accept that risk"
            )
    return problems


def appliance_url_host(text: str) -> str:
    """An address as the host part of a URL: IPv6 in brackets."""
    return f"[{text}]" if ":" in str(text) else str(text)


def appliance_duplicates(values: list[Any]) -> list[Any]:
    """The values that occur more than once, in first-seen order."""
    seen: set[Any] = set()
    dups: list[Any] = []
    for v in values:
        if v in seen and v not in dups:
            dups.append(v)
        seen.add(v)
    return dups


def appliance_path_under(path: str, dirs: list[str]) -> bool:
    """Whether the absolute ``path`` is one of ``dirs`` or lies under one (lexically; ``..`` is resolved)."""
    p = PurePosixPath(posixpath.normpath(str(path)))
    return p.is_absolute() and any(p.is_relative_to(posixpath.normpath(str(d))) for d in dirs)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "appliance_bind_problems": appliance_bind_problems,
            "appliance_url_host": appliance_url_host,
            "appliance_duplicates": appliance_duplicates,
            "appliance_path_under": appliance_path_under,
        }
