"""What should I run: the fastest configuration of a model that fits a memory budget, each candidate's
peak and step time predicted from its own simulated step (`survey`, `timing`), nothing trained.

    lorabench plan --models medium-llama --fit-memory 1.5GiB --batch-size 16 --seq-len 256
    lorabench plan --models medium-llama --target l4 --batch-size 64 --seq-len 1024
    lorabench plan --models medium-llama --fit-memory 1.5GiB --verify    # run the choice: predicted vs measured

The search crosses the free dimensions: the micro-batch (every power of two dividing the effective
batch, gradient accumulation keeping the effective batch), gradient checkpointing, and where the
user leaves them open the precision, the optimizer, the method and the LoRA rank. The first two
change how a step runs, not what it computes; the others change what is trained, and a candidate
that changes them is marked so (`changes`). A candidate fits when its predicted need (the
simulated peak, plus a GPU's runtime context where one was measured) is within the budget less
the margin; the choice is the fitting candidate of the highest predicted throughput (samples per
second of the effective batch).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from .admission import Plan, need_bytes
from .cells import Cell, CellError

# The free dimensions' values when the user does not fix them.
OPEN: dict[str, tuple[str, ...]] = {
    "grad_checkpointing": ("off", "on"),
    "precision": ("fp32", "bf16-mixed"),
    "optimizer": ("adam",),  # list others to search them: sgd, rmsprop, adamw-8bit (docs/plan.md)
}
# What the user's run would train with but for the planner: the first value of each (a change from it is marked).
AS_ASKED = ("precision", "optimizer")
DEFAULT_MARGIN = (
    0.10  # of the budget, kept free: the simulated peak is within 10 % of the measured one (docs/time.md)
)


@dataclass(frozen=True)
class Candidate:
    """One configuration, as predicted."""

    cell: Cell
    need_bytes: int | None  # predicted peak (and a GPU's runtime context); None: not predicted
    step_s: float | None  # predicted optimizer step (every micro-batch)
    why_not: str | None = None  # why it cannot run here (the device, PEFT), or why it has no prediction
    changes: tuple[
        str, ...
    ] = ()  # what it trains differently from the first candidate asked ("precision bf16-mixed")

    @property
    def samples_per_s(self) -> float | None:
        if not self.step_s:
            return None
        return self.cell.batch_size * self.cell.grad_accum / self.step_s

    def fits(self, budget: int, margin: float) -> bool:
        return (
            self.why_not is None and self.need_bytes is not None and self.need_bytes <= budget * (1 - margin)
        )


@dataclass
class Search:
    """Every candidate of one model, predicted, and what the budget makes of them."""

    model: str
    candidates: list[Candidate]
    budget_bytes: int
    budget_from: str  # where the budget comes from ("--fit-memory", a target's data sheet, free memory)
    margin: float
    rates: Any = None  # what the step times were predicted with (`timing.rates_for`)
    plan: Plan | None = None  # every model's candidates, surveyed: what --verify runs from

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits(self.budget_bytes, self.margin)]

    @property
    def choice(self) -> Candidate | None:
        timed = [c for c in self.fitting if c.samples_per_s]
        return max(timed, key=lambda c: (c.samples_per_s, -c.need_bytes)) if timed else None

    @property
    def smallest(self) -> Candidate | None:
        """The candidate of the least predicted need (what a budget below every candidate's must reach)."""
        known = [c for c in self.candidates if c.why_not is None and c.need_bytes is not None]
        return min(known, key=lambda c: c.need_bytes) if known else None

    def front(self) -> list[Candidate]:
        """The Pareto front of need against throughput: no other candidate needs no more and runs faster."""
        known = sorted(
            (c for c in self.candidates if c.why_not is None and c.need_bytes and c.samples_per_s),
            key=lambda c: (c.need_bytes, -c.samples_per_s),
        )
        out: list[Candidate] = []
        for c in known:
            if not out or c.samples_per_s > out[-1].samples_per_s:
                out.append(c)
        return out


def micro_batches(batch: int) -> tuple[int, ...]:
    """Every power of two that divides the effective batch, and the batch itself."""
    out = {m for m in (2**i for i in range(batch.bit_length())) if batch % m == 0}
    return tuple(sorted(out | {batch}))


def candidates(bases: list[Cell], axes: dict[str, tuple], micro: tuple[int, ...] | None = None) -> list[Cell]:
    """Each base cell (a model, method and rank, at its effective batch) crossed with the micro-batches
    and the free axes' values; a combination a cell refuses (CellError) is left out. Raises CellError
    when nothing is left, with the first refusal's reason."""
    out, refused = [], []
    for base in bases:
        effective = base.batch_size * base.grad_accum
        sizes = micro or micro_batches(effective)
        bad = [m for m in sizes if effective % m]
        if bad:
            raise CellError(f"--micro-batches {bad[0]} does not divide the effective batch {effective}")
        for m, values in itertools.product(sizes, itertools.product(*axes.values())):
            try:
                out.append(
                    dataclasses.replace(
                        base,
                        batch_size=m,
                        grad_accum=effective // m,
                        dtype="float32",  # the precision names the dtype
                        **dict(zip(axes, values)),
                    )
                )
            except CellError as e:
                refused.append(str(e))
    if not out:
        raise CellError(f"no candidate can be built: {refused[0] if refused else 'nothing to search'}")
    return out


def changes(cell: Cell, asked: Cell) -> tuple[str, ...]:
    """What `cell` trains differently from `asked` (the method, rank, precision or optimizer the user
    would otherwise have run): the quality of its result may differ, not only its speed."""
    out = []
    if (cell.method, cell.rank) != (asked.method, asked.rank):
        out.append(cell.method_label)
    out += [f"{f} {getattr(cell, f)}" for f in AS_ASKED if getattr(cell, f) != getattr(asked, f)]
    return tuple(out)


def search(
    cells: list[Cell],
    budget: int,
    budget_from: str,
    margin: float = DEFAULT_MARGIN,
    target: str | None = None,
    start_method: str = "forkserver",
) -> list[Search]:
    """Predict every candidate (one survey per distinct shape, one set of rates for all), per model."""
    plan = Plan.of(cells, force=True, start_method=start_method, fit_memory=budget, target=target)
    out: dict[str, Search] = {}
    for cell, s in zip(plan.cells, plan.surveys):
        why = plan.skipped.get(cell.key())
        step = getattr(s.duration, "step", None)
        if why is None and step is None:
            why = f"no step time: {getattr(s.duration, 'reason', 'not predicted')}"
        found = out.setdefault(
            cell.model, Search(cell.model, [], budget, budget_from, margin, plan.rates, plan)
        )
        asked = next(c for c in plan.cells if c.model == cell.model)
        found.candidates.append(
            Candidate(
                cell,
                None if s.unbuildable else need_bytes(cell, s),
                step.seconds if step else None,
                why,
                changes(cell, asked),
            )
        )
    return list(out.values())
