"""The planner's words: each model's choice, its Pareto front, the candidates that fit, the command
that runs the choice, and, after `--verify`, each run candidate's prediction against its measurement.

    lorabench plan --models medium-llama --fit-memory 1.5GiB --verify
"""

from __future__ import annotations

import shlex
from typing import Any

from ..plan.cells import Cell
from ..plan.search import Candidate, Search
from ..results.metrics import framework_peak, is_number

MiB = 2**20
GiB = 2**30
SHOWN = 5  # the fitting candidates the terminal lists besides the front (`--all`: every one)


def size(nbytes: float) -> str:
    """A budget or a need: MiB below a GiB, GiB above."""
    return f"{nbytes / MiB:,.0f} MiB" if nbytes < GiB else f"{nbytes / GiB:,.2f} GiB"


def none_fits(s: Search) -> str:
    """Why a model has no choice: what its smallest candidate needs."""
    least = s.smallest
    smallest = (
        f"{configuration(least.cell)}, is predicted to need {size(least.need_bytes)}"
        if least
        else "none could be predicted"
    )
    return f"no candidate of {s.model} fits {size(s.budget_bytes)} less the {s.margin:.0%} margin: the smallest, {smallest}"


def configuration(cell: Cell) -> str:
    """A candidate in a few words: `lora r=16, micro 4 x 4, ckpt on, bf16-mixed, adam`."""
    return (
        f"{cell.method_label}, micro {cell.batch_size} x {cell.grad_accum}, ckpt {cell.grad_checkpointing}, "
        f"{cell.precision}, {cell.optimizer}"
    )


def command(cell: Cell) -> str:
    """The `lorabench run` line that runs this candidate (its timing and memory, one cell)."""
    argv = ["lorabench", "run", "--models", cell.model, "--methods", cell.method]
    argv += ["--ranks", str(cell.rank)] if cell.rank is not None else []
    argv += ["--batch-size", str(cell.batch_size), "--grad-accum", str(cell.grad_accum)]
    argv += ["--seq-len", str(cell.seq_len), "--grad-checkpointing", cell.grad_checkpointing]
    argv += ["--precision", cell.precision, "--optimizer", cell.optimizer, "--device", cell.device]
    return shlex.join(argv)


def _row(c: Candidate, s: Search, quality: dict[str, float] | None) -> list[str]:
    fits = "yes" if c.fits(s.budget_bytes, s.margin) else (c.why_not or "no")
    out = [
        configuration(c.cell),
        f"{c.need_bytes / MiB:,.0f}" if c.need_bytes is not None else "",
        fits,
        f"{c.step_s * 1e3:,.1f}" if c.step_s else "",
        f"{c.samples_per_s:,.1f}" if c.samples_per_s else "",
        ", ".join(c.changes) or "-",
    ]
    if quality is not None:
        found = quality.get(trained_key(c.cell))
        out.append(f"{found:.4f}" if found is not None else "")
    return out


def _table(rows: list[list[str]], quality: bool) -> str:
    head = ["candidate", "need (MiB)", "fits", "step (ms)", "samples/s", "trains differently"]
    head += ["quality"] if quality else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def search(s: Search, quality: dict[str, float] | None = None, every: bool = False) -> str:
    """One model's plan: the budget, the choice and its command, the front, the fastest that fit."""
    budget = f"{size(s.budget_bytes)} ({s.budget_from}) less a {s.margin:.0%} margin"
    fitting = s.fitting
    out = [
        f"{s.model}: {len(s.candidates)} candidates, {len(fitting)} predicted to fit {budget}",
        f"step times: {getattr(s.rates, 'device', '')} ({getattr(s.rates, 'source', getattr(s.rates, 'reason', ''))})",
    ]
    choice = s.choice
    if choice is not None:
        out += [
            "",
            f"Choice: {configuration(choice.cell)}: predicted {choice.need_bytes / MiB:,.0f} MiB, "
            f"{choice.samples_per_s:,.1f} samples/s"
            + (f"; trains differently: {', '.join(choice.changes)}" if choice.changes else ""),
            f"  {command(choice.cell)}",
        ]
    out += [
        "",
        "Pareto front (need against throughput):",
        _table([_row(c, s, quality) for c in s.front()], quality is not None),
    ]
    shown = sorted(fitting if not every else s.candidates, key=lambda c: -(c.samples_per_s or 0))
    if not every:
        shown = shown[:SHOWN]
    title = (
        "Every candidate:" if every else f"The fastest {len(shown)} that fit (--all lists every candidate):"
    )
    out += ["", title, _table([_row(c, s, quality) for c in shown], quality is not None)]
    return "\n".join(out)


def trained_key(cell: Cell) -> str:
    """What a candidate trains (model, method, rank, precision, optimizer): how quality figures are matched."""
    return f"{cell.model}|{cell.method_label}|{cell.precision}|{cell.optimizer}"


def measured_peak(m: dict[str, Any]) -> float | None:
    """The measured peak a memory budget binds: on a GPU the allocator's reserved peak, on the CPU
    the larger of the live tensors' peak and the step's RSS peak (the C library's freed heap handed
    back)."""
    if is_number(m.get("torch_peak_reserved_bytes")):
        return m["torch_peak_reserved_bytes"]
    found = [v for v in (framework_peak(m), m.get("host_rss_step_peak_bytes")) if is_number(v)]
    return max(found) if found else None


def verification(pairs: list[tuple[Candidate, Any]], budget: int) -> str:
    """Each run candidate's predicted need and throughput against the row's measured ones."""
    head = "| candidate | need (MiB) | measured peak (MiB) | within budget | samples/s predicted | measured | predicted / measured |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for c, row in pairs:
        m = row.metrics if row is not None else {}
        peak = measured_peak(m)
        measured = m.get("samples_per_s") if is_number(m.get("samples_per_s")) else None
        status = row.status.value if row is not None else "no row"
        lines.append(
            "| "
            + " | ".join(
                [
                    configuration(c.cell),
                    f"{c.need_bytes / MiB:,.0f}",
                    f"{peak / MiB:,.0f}" if peak is not None else status,
                    ("yes" if peak <= budget else "NO") if peak is not None else "",
                    f"{c.samples_per_s:,.1f}",
                    f"{measured:,.1f}" if measured else status,
                    f"{c.samples_per_s / measured:.2f}" if measured else "",
                ]
            )
            + " |"
        )
    return "\n".join(lines)
