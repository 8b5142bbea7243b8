"""A cell of several processes: their figures folded into one row, as each metric's `fold` says.

    lorabench run --models bert-tiny --methods full --nproc 2 --strategy fsdp2

Each process of a cell sends what it measured (`Measured`), or ends without it (its exit code). The
row takes, per metric (`metrics.METRICS`): the leader's figure, the max over the processes that
measured it (per device: what must fit; the slowest process's time), or the sum over the distinct
devices they used (a device's own counter: energy); the `sum_of` companions where every process
reported; and one entry per process (its `per_process` figures, its device, whether it started
clean of CUDA). A process that failed ends the cell, named, beside what the others measured.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

from ..measure import environment
from ..measure.trackers import Unavailable, unavailable
from ..plan.cells import Cell
from .measured import Measured
from .metrics import METRICS, is_number
from .rows import Row, Status


@dataclass
class ProcessResult:
    """What one process of a cell sent, or how it ended without sending it."""

    index: int  # the process's place in its group (torchrun's RANK)
    measured: Measured | None = None
    exitcode: int | None = None
    ended_at: float | None = None  # monotonic time its failure was seen

    @property
    def failed(self) -> bool:
        if self.measured is not None:
            return self.measured.failed
        return self.exitcode is not None

    def death(self) -> str:
        """How a process ended without a result."""
        if self.exitcode is not None and self.exitcode < 0:
            return signal.Signals(-self.exitcode).name
        return f"exit code {self.exitcode}"


def root_cause(results: list[ProcessResult]) -> ProcessResult | None:
    """The process whose failure ended the cell. A peer's death makes the others raise moments later
    (gloo: "connection reset by peer"), so of the failures seen within a second of the first, one
    that died without a result (a signal, an exit) is the cause before one that raised."""
    failed = [x for x in results if x.failed]
    if not failed:
        return None
    first = min(x.ended_at or 0.0 for x in failed)
    together = [x for x in failed if (x.ended_at or 0.0) <= first + 1.0]
    return min(together, key=lambda x: (x.measured is not None, x.ended_at or 0.0, x.index))


@dataclass
class Folded:
    figures: dict[str, Any] = field(default_factory=dict)
    per_process: list[dict[str, Any]] = field(default_factory=list)


def fold(results: list[ProcessResult]) -> Folded:
    """One row's figures from every process's, as each metric's `fold` says."""
    measured = {x.index: x.measured for x in results if x.measured is not None}
    figures = {i: m.figures for i, m in measured.items()}
    out = Folded(dict(figures.get(0, {})))
    for metric in METRICS:
        values = {i: f.get(metric.key) for i, f in figures.items()}
        numbers = [v for v in values.values() if is_number(v)]
        if metric.fold == "max" and numbers:
            out.figures[metric.key] = max(numbers)
        elif metric.fold == "devices":
            out.figures[metric.key] = _over_devices(results, values, measured)
        if metric.sum_of:
            parts = [f.get(metric.sum_of) for f in figures.values()]
            if len(parts) == len(results) and all(is_number(v) for v in parts):
                out.figures[metric.key] = sum(parts)
    kept = [m.key for m in METRICS if m.per_process]
    for x in results:
        f = figures.get(x.index, {})
        facts = x.measured.env_facts if x.measured else {}
        entry = {
            "process": x.index,
            "status": x.measured.status.value if x.measured else Status.CRASHED.value,
            "device": device_key(facts),
            "cuda_bad_fork": facts.get("cuda_bad_fork"),
        }
        entry.update({k: f[k] if is_number(f.get(k)) else None for k in kept})
        out.per_process.append(entry)
    return out


def device_key(facts: dict[str, Any]) -> str | None:
    """Which physical device a process used: its PCI address, else its UUID. On ROCm torch's UUID
    comes from HIP's unique id, which devices without one report alike (all zeros), so two GPUs could
    be counted as one; no two devices share a PCI address."""
    return facts.get("gpu_pci_bus_id") or facts.get("gpu_uuid")


def _over_devices(results: list[ProcessResult], values: dict[int, Any], measured: dict[int, Measured]):
    """The sum over the cell's devices of a device's own counter (energy), each device once however
    many processes read it; unavailable, with the first process's reason, unless every one read it."""
    for x in results:
        v = values.get(x.index)
        if not is_number(v):
            why = (
                v.reason
                if isinstance(v, Unavailable)
                else ("it ended without a result" if x.index not in measured else "it did not measure it")
            )
            return unavailable(f"process {x.index} of {len(results)}: {why}")
    per_device: dict[Any, float] = {}
    for i, v in values.items():
        device = device_key(measured[i].env_facts) or ("process", i)  # unknown: a device of its own
        per_device[device] = max(per_device.get(device, v), v)  # two readings of one counter: one interval
    return sum(per_device.values())


def row_of(cell: Cell, results: list[ProcessResult], known: dict[str, Any], started: float) -> Row:
    """The cell's row from its processes' results: folded figures, and the status of the process that
    ended it (`root_cause`). `known`: figures made before the cell ran (its prediction)."""
    folded = fold(results)
    leader = next((x.measured for x in results if x.measured), None) or Measured(Status.CRASHED)
    status, error = leader.status, leader.error
    cause = root_cause(results)
    where = f"process {cause.index} of {cell.nproc}" if cause else ""
    if cause is not None and cause.measured is not None:
        status, error = cause.measured.status, dict(cause.measured.error or {})
        error["message"] = f"{where}: {error.get('message', '')}"
    elif cause is not None:
        status = Status.CRASHED
        error = {
            "type": cause.death(),
            "message": f"{where}: the process died from {cause.death()}",
            "traceback": [],
        }
    figures = {**known, **folded.figures, "cell_wall_s": time.perf_counter() - started}
    # the processes' view of the machine; their agent never touches a GPU (they fork from it)
    env = leader.env_facts or environment.capture(cell.device, gpu=False)
    return Row.make(
        cell,
        status,
        figures,
        epochs=leader.epochs,
        pretrain_epochs=leader.pretrain,
        curve=leader.curve,
        environment=env,
        error=error,
        per_process=folded.per_process,
    )
