"""Which of the asked cells a run admits: its shard, those predicted to fit, those the device can run.

    lorabench run --dry-run --shard 2/4          # this machine's quarter of the matrix, surveyed

Every cell is surveyed (`survey`: on torch's meta device, milliseconds), which refuses an
unbuildable cell before anything is written, balances shards by predicted cost, and gates cells
predicted not to fit in free memory or whose precision or quantisation the device cannot run (asked
in a child: the parent never initialises CUDA).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import child
from ..measure import calibration, environment, simulation, steptime
from ..measure.rates import Rates
from ..measure.trackers import Unavailable
from ..workload import models
from . import timing
from .cells import Cell, CellError
from .survey import PROBE_TIMEOUT_S, PlanError, Survey, probe, survey_all, to_probe


def shard(cells: list[Cell], costs: list[float], k: int, n: int) -> list[Cell]:
    """Cells of shard k (1-based) of n: every cell lands in exactly one shard, balanced by cost.

    Greedy longest-processing-time: the costliest cell goes to the least loaded shard, ties broken
    by the cell's key and the shard's index, so every machine computes the same partition.
    """
    if not 1 <= k <= n:
        raise CellError(f"--shard {k}/{n}: K must be between 1 and N")
    load = [0.0] * n
    owner: dict[str, int] = {}
    for cost, cell in sorted(zip(costs, cells), key=lambda ck: (-ck[0], ck[1].key())):
        i = min(range(n), key=lambda j: (load[j], j))
        load[i] += cost
        owner[cell.key()] = i + 1
    return [c for c in cells if owner[c.key()] == k]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise CellError(f"--shard must look like K/N (e.g. 2/4), got {text!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise CellError(f"--shard {text}: need 1 <= K <= N")
    return k, n


def matrix_id(cells: list[Cell]) -> str:
    """Identity of a whole matrix (before sharding): shards of one matrix share it."""
    return hashlib.sha256("\n".join(c.key() for c in cells).encode()).hexdigest()[:16]


def predicted_cost(cell: Cell, s: Survey) -> float:
    """Training FLOPs of the whole cell (balances shards); 6 per parameter and token where they
    could not be counted."""
    steps = cell.samples // (cell.batch_size * cell.grad_accum)
    per_step = s.prediction.flops_per_step
    if per_step is None:
        per_step = 6.0 * s.params.total * s.prediction.tokens_per_step
    return per_step * steps * (cell.epochs + cell.warmup_epochs + cell.pretrain_epochs)


def context_kind(cell: Cell) -> str:
    """The kind of cell a GPU runtime context is recorded and looked up under (`calibration`): what
    loads kernel modules and buffers beyond an fp32 MLP's (attention, another dtype, compiled
    kernels, a quantised base, NCCL)."""
    parts = ["transformer" if models.uses_transformers(cell.model) else "mlp", cell.compute_dtype]
    parts += ["compiled"] if cell.compiled else []
    parts += [cell.quantize] if cell.quantized else []
    parts += [f"{cell.strategy} x{cell.nproc}"] if cell.nproc > 1 else []
    return ", ".join(parts)


def runtime_context(cell: Cell) -> tuple[int, str | None]:
    """(bytes, where they come from) of the GPU runtime context a cell adds beyond its tensors: the
    largest recorded for its kind, else the largest recorded at all (`calibration.context`), or 0
    and a note that none was measured. The CPU has none."""
    if not cell.on_gpu:
        return 0, None
    found = calibration.context(context_kind(cell))
    if found is None:
        return 0, (
            "the GPU runtime context is not in the predicted needs: no `lorabench check --device cuda` "
            f"or GPU cell has measured one on this machine ({calibration.path()})"
        )
    name, kind, n = found
    return (
        n,
        f"a GPU cell's need includes the runtime context measured on {name}: {n / 2**20:,.0f} MiB ({kind})",
    )


def _times(d: "timing.Duration | Unavailable | None") -> dict[str, Any]:
    if isinstance(d, timing.Duration):
        return d.to_metrics()
    return {"dry_run_step_s": d} if isinstance(d, Unavailable) else {}


def need_bytes(cell: Cell, s: Survey) -> int:
    """The memory a cell is predicted to need of its device: its predicted peak (every process's on
    the CPU, whose ranks all draw on the one host memory), plus a GPU cell's runtime context."""
    return s.prediction.peak_bytes * (1 if cell.on_gpu else cell.nproc) + runtime_context(cell)[0]


def fit_gate(
    cells: list[Cell], surveys: list[Survey], free: int | None, what: str, force: bool
) -> dict[str, str]:
    """{cell key: why it is skipped} for cells predicted to need more than `free` bytes (`what`
    says what was read): the predicted peak, plus a GPU cell's runtime context (`runtime_context`).
    A prediction is per device: the ranks of a CPU cell all draw on the one host memory. When no
    cell fits, the whole plan is refused (PlanError)."""
    if free is None or force:
        return {}
    gib = 2**30
    context = {c.key(): runtime_context(c)[0] for c in cells}
    need = {c.key(): need_bytes(c, s) for c, s in zip(cells, surveys)}
    skipped = {
        c.key(): f"predicted to need {need[c.key()] / gib:.2f} GiB ({s.prediction.peak_by}"
        + (f" + the runtime context, {context[c.key()] / 2**20:,.0f} MiB" if context[c.key()] else "")
        + f"); {what}: "
        f"{free / gib:.2f} GiB (--force runs it anyway)"
        for c, s in zip(cells, surveys)
        if need[c.key()] > free
    }
    if cells and len(skipped) == len(cells):
        raise PlanError(
            f"no cell fits this device: the largest is predicted to need {max(need.values()) / gib:.2f} "
            f"GiB, {what}: {free / gib:.2f} GiB (--force runs them anyway)"
        )
    return skipped


@dataclass
class Plan:
    """What a run will do: its cells (this shard's), the whole matrix, their surveys, and the cells
    the fit gate skips, with why."""

    cells: list[Cell]
    matrix: list[Cell]
    surveys: list[Survey]
    skipped: dict[str, str] = field(default_factory=dict)
    shard: str | None = None
    fit_note: str | None = None  # why no fit check could be made, or what a GPU's check added
    rates: Rates | Unavailable | None = None  # what the cells' times were predicted with

    @classmethod
    def of(
        cls,
        cells: list[Cell],
        shard_spec: str | None = None,
        force: bool = False,
        start_method: str = "forkserver",
        fit_memory: int | None = None,
        target: str | None = None,
        quiet: Callable[[], None] = lambda: None,
    ) -> "Plan":
        """Survey every cell, keep shard K/N of them, gate those predicted not to fit (in free memory,
        or in `fit_memory` bytes), and skip those whose precision, quantisation or optimizer the
        device cannot run (asked in a child: `probe`). `quiet()` returns once nothing else this
        process started (the fork server's imports) competes with the rates it then measures."""
        k_n = parse_shard(shard_spec) if shard_spec else None
        surveys = survey_all(cells)
        matrix = cells
        if k_n:
            chosen = {
                c.key() for c in shard(cells, [predicted_cost(c, s) for c, s in zip(cells, surveys)], *k_n)
            }
            surveys = [s for c, s in zip(cells, surveys) if c.key() in chosen]
            cells = [c for c in cells if c.key() in chosen]
        device = cells[0].device if cells else "cpu"
        if fit_memory is not None:  # a device the user does not have: its capacity, as they said it
            free, what = fit_memory, "--fit-memory"
        else:
            free, what = environment.free_memory_bytes(device)
        notes = sorted({note for note in (runtime_context(c)[1] for c in cells) if note})
        skipped = fit_gate(cells, surveys, free, what, force)
        skipped.update({c.key(): s.unbuildable for c, s in zip(cells, surveys) if s.unbuildable})
        # a precision this device cannot run, a quantisation bitsandbytes cannot serve: skipped, with why
        asked = to_probe(cells)
        if asked:
            try:
                answers = child.call(
                    probe,
                    (device, asked),
                    start_method=start_method,
                    timeout_s=PROBE_TIMEOUT_S,
                    name="lorabench-probe",
                )
            except child.ChildFailed as e:
                answers = {
                    axis: {v: f"could not ask {device} whether it runs {axis} {v}: {e}" for v in values}
                    for axis, values in asked.items()
                }
            for axis, whys in answers.items():
                skipped.update({c.key(): whys[getattr(c, axis)] for c in cells if whys.get(getattr(c, axis))})
        # how long each cell that runs takes, from its simulated step and the device's rates
        running = [(c, s) for c, s in zip(cells, surveys) if c.key() not in skipped]
        quiet()
        found = timing.rates_for([c for c, _ in running], [s for _, s in running], target, start_method)
        timed = dict(
            zip([c.key() for c, _ in running], timing.durations(*zip(*running), found) if running else [])
        )
        surveys = [dataclasses.replace(s, duration=timed.get(c.key())) for c, s in zip(cells, surveys)]
        return cls(
            cells,
            matrix,
            surveys,
            skipped,
            shard_spec,
            "; ".join(notes) or None if free is not None else f"no fit check before running: {what}",
            found,
        )

    def known(self) -> dict[str, dict[str, Any]]:
        """Figures known of each cell before it runs (its prediction, its predicted times), by cell key."""
        return {
            c.key(): {**s.prediction.to_metrics(), **_times(s.duration)}
            for c, s in zip(self.cells, self.surveys)
        }

    def steps(self) -> dict[str, Any]:
        """Each simulated cell's step, as its process predicts its time from it, by cell key."""
        return {
            c.key(): steptime.SimulatedStep(
                s.prediction.simulated.ops, s.prediction.simulated.trained_tensors
            )
            for c, s in zip(self.cells, self.surveys)
            if isinstance(s.prediction.simulated, simulation.Simulated) and c.nproc == 1
        }

    def predicted_s(self) -> float | None:
        """The predicted time of the cells that run (None where any has none)."""
        times = [s.duration for c, s in zip(self.cells, self.surveys) if c.key() not in self.skipped]
        if not times or any(not isinstance(d, timing.Duration) for d in times):
            return None
        return sum(d.cell_s for d in times)

    def gemms(self) -> dict[str, list[tuple[int, int, int]]]:
        """The GEMM shapes of the cells that will run, by dtype: what the matmul ceiling is measured on."""
        out: dict[str, set] = {}
        for c, s in zip(self.cells, self.surveys):
            if c.key() not in self.skipped:
                out.setdefault(c.compute_dtype, set()).update(s.gemms)
        return {dtype: sorted(shapes) for dtype, shapes in out.items()}

    def to_json(self, run_id: str, argv: list[str]) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "argv": argv,
            "matrix_id": matrix_id(self.matrix),
            "shard": self.shard,
            "lorabench_commit": environment.project_commit(),
            "skipped": self.skipped,
            "cells": [c.to_dict() for c in self.cells],
            "matrix": [c.to_dict() for c in self.matrix],
        }
