"""The dependency locks (scripts/lock.sh) agree with pyproject.toml, without the network.

What is checked: every declared requirement is locked at a version its specifier allows, everything the locks name as
declared in pyproject.toml still is, every pin carries hashes, and the runtime locks (the hosts' wheelhouse, plain
setup) pin exactly what the dev lock (CI) pins. ``scripts/lock.sh --check`` re-resolves against the index instead.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = canonicalize_name("appliance")
FIX = "run scripts/lock.sh and commit the locks (docs/operations.md, Upgrade a dependency)"
# The locks' target (scripts/lock.sh): markers in pyproject.toml are evaluated for it, not for the running Python.
TARGET = {
    "implementation_name": "cpython",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.11.0",
    "python_version": "3.11",
    "sys_platform": "linux",
}
# Each lock and the extras of pyproject.toml it covers besides the runtime dependencies.
LOCKS = {
    "requirements.lock": (),
    "requirements-model.lock": ("model",),
    "requirements-dev.lock": ("dev", "model"),
}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(?:\s*;\s*([^\\]+?))?\s*\\?$")
_HASH = re.compile(r"^\s+--hash=sha256:([0-9a-f]{64})\s*\\?$")
_VIA = re.compile(r"^\s+# via (.*)$")


@dataclass
class Pin:
    version: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def read_lock(name: str) -> tuple[str, dict[NormalizedName, Pin]]:
    """The lock's header (its leading comment lines) and its pins by normalized name."""
    header: list[str] = []
    pins: dict[NormalizedName, Pin] = {}
    current: Pin | None = None
    for number, line in enumerate((ROOT / name).read_text().splitlines(), 1):
        if not pins and line.startswith("#"):
            header.append(line)
        elif match := _PIN.match(line):
            key = canonicalize_name(match[1])
            assert key not in pins, f"{name}:{number}: {match[1]} is pinned twice"
            current = pins[key] = Pin(match[2])
        elif (match := _HASH.match(line)) and current is not None:
            current.hashes.append(match[1])
        elif (match := _VIA.match(line)) and current is not None:
            current.via += [part.strip() for part in match[1].split(",")]
        elif line.strip() and not line.lstrip().startswith("#"):
            pytest.fail(f"{name}:{number}: not a pin, hash or comment (only name==version with hashes): {line!r}")
    return "\n".join(header), pins


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project: dict[str, Any] = tomllib.load(f)["project"]
    return project


def declared(extras: tuple[str, ...]) -> list[Requirement]:
    """The runtime dependencies and those of ``extras``, the project's own extras (``appliance[test]``) expanded;
    only those whose marker holds on the target."""
    project = pyproject()
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    found: list[Requirement] = []
    seen: set[str] = set()

    def add(specs: list[str], extra: str) -> None:
        for spec in specs:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({**TARGET, "extra": extra}):
                continue
            if canonicalize_name(req.name) == PROJECT:
                for sub in sorted(req.extras - seen):
                    seen.add(sub)
                    add(optional[sub], sub)
            else:
                found.append(req)

    add(project["dependencies"], "")
    for extra in extras:
        assert extra in optional, f"pyproject.toml has no extra {extra!r} any more: update scripts/lock.sh and {LOCKS}"
        if extra not in seen:
            seen.add(extra)
            add(optional[extra], extra)
    return found


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[NormalizedName, Pin]]:
    return {name: read_lock(name)[1] for name in LOCKS}


@pytest.mark.parametrize("name", LOCKS)
def test_header_names_the_target(name: str) -> None:
    header, _ = read_lock(name)
    assert "Target: CPython 3.11, Linux x86_64" in header, f"{name}: the header lost its target line; {FIX}"


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_has_hashes(name: str, locks: dict[str, dict[NormalizedName, Pin]]) -> None:
    assert locks[name], f"{name} pins nothing"
    bare = sorted(pkg for pkg, pin in locks[name].items() if not pin.hashes)
    assert not bare, f"{name}: no hashes for {bare} (pip --require-hashes refuses them); {FIX}"
    assert PROJECT not in locks[name], f"{name} pins the appliance itself; it is installed from the checkout"


@pytest.mark.parametrize("name", LOCKS)
def test_declared_requirements_are_locked_within_their_specifiers(
    name: str, locks: dict[str, dict[NormalizedName, Pin]]
) -> None:
    problems = []
    for req in declared(LOCKS[name]):
        pin = locks[name].get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} is not locked")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{req} but {req.name}=={pin.version} is locked")
    assert not problems, f"{name} disagrees with pyproject.toml: {'; '.join(problems)}; {FIX}"


@pytest.mark.parametrize("name", LOCKS)
def test_locked_top_level_requirements_are_still_declared(
    name: str, locks: dict[str, dict[NormalizedName, Pin]]
) -> None:
    wanted = {canonicalize_name(req.name) for req in declared(LOCKS[name])}
    stale = sorted(
        pkg for pkg, pin in locks[name].items()
        if any(via.startswith("appliance (") for via in pin.via) and pkg not in wanted
    )
    assert not stale, f"{name} locks {stale} as pyproject.toml's, which no longer declares them; {FIX}"


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_is_required_by_something_locked(name: str, locks: dict[str, dict[NormalizedName, Pin]]) -> None:
    pins = locks[name]
    orphans = []
    for pkg, pin in pins.items():
        parents = [via for via in pin.via if not via.startswith(("-c ", "-r "))]
        if not any(via.startswith("appliance (") or canonicalize_name(via) in pins for via in parents):
            orphans.append(f"{pkg} (via {pin.via})")
    assert not orphans, f"{name}: nothing locked requires {orphans}; {FIX}"


@pytest.mark.parametrize("name", [name for name in LOCKS if name != "requirements-dev.lock"])
def test_runtime_locks_pin_what_ci_tested(name: str, locks: dict[str, dict[NormalizedName, Pin]]) -> None:
    dev = locks["requirements-dev.lock"]
    differ = sorted(
        f"{pkg}=={pin.version}" for pkg, pin in locks[name].items()
        if pkg not in dev or (dev[pkg].version, sorted(dev[pkg].hashes)) != (pin.version, sorted(pin.hashes))
    )
    assert not differ, f"{name} pins {differ} unlike requirements-dev.lock (what CI tests); {FIX}"
