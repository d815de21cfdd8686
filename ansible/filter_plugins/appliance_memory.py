"""The memory plan's checks that need no model file, for the appliance role's preflight.

``appliance check-config`` on the host checks the whole plan, estimates from the GGUF files included, before the
config is written; this catches what the inventory alone shows (a device without a budget, always-loaded models whose
``memory_mib`` exceed a budget) before anything changes on a host.
"""

from __future__ import annotations

from typing import Any


def _figures(model: dict[str, Any]) -> dict[str, int]:
    mib = model.get("memory_mib")
    if isinstance(mib, dict):
        return {str(d): int(v) for d, v in mib.items()}
    if mib is None:
        return {}
    devices = model.get("devices") or (["CPU"] if not model.get("gpu_layers") else [])
    return {str(devices[0]): int(mib)} if len(devices) == 1 else {}


def appliance_memory_problems(models: list[dict[str, Any]], memory: dict[str, Any]) -> list[str]:
    """Why the inventory's memory plan cannot work; empty when nothing is known to be wrong."""
    if not memory:
        return []
    problems = []
    always: dict[str, int] = {}
    for m in models:
        name = m.get("name", "?")
        devices = m.get("devices") or (["CPU"] if not m.get("gpu_layers") else [])
        if not devices:
            problems.append(f"{name}: offloads layers (gpu_layers): name its devices so its memory is counted")
        for device in devices:
            if device not in memory:
                problems.append(f"{name}: device {device} has no budget in appliance_memory")
        for device, mib in _figures(m).items():
            if device in memory and mib > int(memory[device]):
                problems.append(f"{name}: memory_mib {device} = {mib} exceeds the budget of {memory[device]} MiB")
            if m.get("load", "always") == "always":
                always[device] = always.get(device, 0) + mib
    for device, total in always.items():
        if device in memory and total > int(memory[device]):
            problems.append(f"the always-loaded models need {total} MiB of {device}, more than its budget of "
                            f"{memory[device]} MiB")
    return problems


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"appliance_memory_problems": appliance_memory_problems}
