"""The memory a GPU's runtime context takes (CUDA or HIP: the driver's view of a process beyond
the allocator's reserved bytes), as `lorabench check` measured it, kept per device name so a fit
check can add it, on this machine or for a device you do not have.

    lorabench check --device cuda      # measures it on this GPU and records it
    lorabench run --dry-run --device cuda --models medium-llama --fit-memory 80GB   # adds it

The record is a small JSON file in the user's cache ($LORABENCH_CACHE, else
$XDG_CACHE_HOME/lorabench, else ~/.cache/lorabench): {device name: {kind, bytes, torch}}. A
prediction never invents the figure: where no device of the kind was measured, it says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import write_json

FILE = "contexts.json"


def path() -> Path:
    root = os.environ.get("LORABENCH_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "lorabench"
    )
    return Path(root) / FILE


def known() -> dict[str, dict]:
    """Every recorded context: {device name: {"kind", "bytes", "torch"}}; {} when none (or unreadable)."""
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(device_name: str, kind: str, context_bytes: int, torch_version: str) -> None:
    """Keep the context measured on `device_name`, replacing an older one. `kind` is torch's device
    type ("cuda", which ROCm's HIP answers to as well)."""
    data = known()
    data[device_name] = {"kind": kind, "bytes": int(context_bytes), "torch": torch_version}
    path().parent.mkdir(parents=True, exist_ok=True)
    write_json(path(), data)


def largest(kind: str) -> tuple[str, int] | None:
    """(device name, bytes) of the largest context recorded for `kind`: what a fit check adds for a
    device of that kind it cannot name; None where none was measured."""
    of_kind = [(name, r["bytes"]) for name, r in known().items() if r.get("kind") == kind and r.get("bytes")]
    return max(of_kind, key=lambda nb: nb[1]) if of_kind else None
