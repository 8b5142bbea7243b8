"""What lorabench measured of a GPU, kept per device name, so a prediction on this machine, or for a
device you do not have, uses it.

    lorabench check --device cuda      # the runtime context, the energy counter's update period
    lorabench run --device cuda        # each GPU cell's runtime context, by the kind of cell
    lorabench run --dry-run --device cuda --models medium-llama --fit-memory 80GB   # reads them

A GPU's runtime context (CUDA or HIP: what the driver sees of a process beyond the allocator's
reserved bytes) grows as kernels load: lazily, per dtype, for attention, for compiled code, and
NCCL keeps buffers of its own. `lorabench check` measures it after an fp32 MLP, the least a cell
has; every GPU cell records the context it actually had, under its kind (`plan.admission.
context_kind`), and a fit check adds the one recorded for the cell's kind.

The record is a small JSON file in the user's cache ($LORABENCH_CACHE, else
$XDG_CACHE_HOME/lorabench, else ~/.cache/lorabench):
{device name: {"kind": "cuda", "torch": version, "contexts": {cell kind: bytes},
"energy_update_s": seconds, "rates": what the step-time model reads (`rates.Rates`)}}. Nothing is invented: where nothing was measured, callers say so.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import cache_dir, write_json

FILE = "devices.json"
CHECK = "lorabench check (fp32 MLP)"  # the cell kind of the check's own measurement


def path() -> Path:
    return cache_dir() / FILE


def known() -> dict[str, dict]:
    """Every device's record: {device name: {...}}; {} when none (or the file is unreadable)."""
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _update(device_name: str, kind: str, torch_version: str, **facts) -> None:
    data = known()
    entry = data.setdefault(device_name, {})
    entry.update(kind=kind, torch=torch_version)
    for key, value in facts.items():
        if isinstance(value, dict):
            entry.setdefault(key, {}).update(value)
        else:
            entry[key] = value
    path().parent.mkdir(parents=True, exist_ok=True)
    write_json(path(), data)


def record_context(
    device_name: str, cell_kind: str, context_bytes: int, torch_version: str, kind: str = "cuda"
) -> None:
    """Keep the runtime context a process of `cell_kind` had on `device_name`, replacing an older
    one. `kind` is torch's device type ("cuda", which ROCm's HIP answers to as well)."""
    _update(device_name, kind, torch_version, contexts={cell_kind: int(context_bytes)})


def record_energy_update(device_name: str, seconds: float, torch_version: str, kind: str = "cuda") -> None:
    """Keep how often `device_name`'s energy counter moves (seconds between updates)."""
    _update(device_name, kind, torch_version, energy_update_s=float(seconds))


def context(cell_kind: str, kind: str = "cuda") -> tuple[str, str, int] | None:
    """(device name, cell kind, bytes) a fit check adds for a cell of `cell_kind` on a device of
    `kind` it cannot name: the largest recorded for that cell kind, else the largest recorded for
    any (the check's fp32 MLP is the least a cell has); None where nothing was measured."""
    found = [
        (name, k, int(n))
        for name, r in known().items()
        if r.get("kind") == kind
        for k, n in (r.get("contexts") or {}).items()
        if n
    ]
    same = [f for f in found if f[1] == cell_kind]
    pick = same or found
    return max(pick, key=lambda f: f[2]) if pick else None


def record_rates(device_name: str, rates: dict, torch_version: str, kind: str = "cuda") -> None:
    """Keep the rates `lorabench check` measured on `device_name` (`rates.Rates`, without the
    products it timed on a model's own shapes), replacing older ones."""
    _update(device_name, kind, torch_version, rates={k: v for k, v in rates.items() if k != "timed_s"})


def rates(device_name: str) -> dict | None:
    """The rates recorded for `device_name`, or None."""
    found = known().get(device_name, {}).get("rates")
    return found if isinstance(found, dict) else None


def energy_update_s(device_name: str) -> float | None:
    """Seconds between updates of `device_name`'s energy counter, as `lorabench check` measured it."""
    value = known().get(device_name, {}).get("energy_update_s")
    return float(value) if value else None
