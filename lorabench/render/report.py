"""Markdown reports from result rows: the only place (with `tables`) that turns numbers into text.

    lorabench report results/<run-id>       # writes report/<run-id>.md and prints it

A report has one section per model: the comparison table (one row per figure of `metrics.METRICS`
that was measured), a rank sweep with its plot, quality per epoch, and predicted vs measured
memory; then failed cells, figures not available with their reasons, and the environment.
`tables` builds each table; this module lays them out. `comparison` renders `compare`,
`benchmarks` pytest-benchmark results, `listings` the texts of `lorabench list` and `check`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..plan.axes import AXES
from ..plan.cells import Cell
from ..results.quality import Goal
from ..results.rows import Row
from . import quality
from .headlines import against_leanest_full, headline
from .plots import axis_picture, memory_picture, plot_name, timeline_picture
from .tables import (
    Variant,
    answers_table,
    comparison_table,
    epochs_table,
    groups,
    long_table,
    markdown,
    memory_key,
    prediction_table,
    rank_sweep_table,
    scaling_table,
    varying,
)


def _settings_line(cell: Cell, variants: list[Variant]) -> str:
    data = next((v.info.get("data") for v in variants if v.ok and v.info.get("data")), cell.data)
    accum = f" x {cell.grad_accum} accumulated" if cell.grad_accum > 1 else ""
    lrs = {v.label: v.cell.lr for v in variants}
    lr = (
        f"{cell.lr:g}"
        if len(set(lrs.values())) == 1
        else ", ".join(f"{lr_:g} ({label})" for label, lr_ in lrs.items())
    )
    knobs = cell.precision + (", gradient checkpointing" if cell.checkpointed else "")
    return (
        f"Device `{cell.device}` ({knobs}), weights: {cell.weights}, data: {data}; "
        f"batch {cell.batch_size}{accum}, {cell.samples} training / {cell.eval_samples} eval samples, "
        f"{cell.warmup_epochs} warm-up + {cell.epochs} timed epochs, {cell.optimizer} lr {lr}, seed {cell.seed}."
    )


def _failures(rows: list[Row]) -> str:
    bad = [r for r in rows if not r.ok]
    if not bad:
        return ""
    df = pd.DataFrame(
        {
            "model": [r.cell.model for r in bad],
            "method": [r.label for r in bad],
            "repeat": [r.cell.repeat for r in bad],
            "status": [r.status.value for r in bad],
            "reason": [
                f"{(r.error or {}).get('type', '')}: {(r.error or {}).get('message', '')}".replace("|", "\\|")
                for r in bad
            ],
        }
    )
    return markdown(df)


def _unavailable_notes(rows: list[Row]) -> list[str]:
    notes: dict[str, str] = {}
    for r in rows:
        for k, why in r.unavailable.items():
            notes.setdefault(k, why)
    return [f"- `{k}`: unavailable: {v}" for k, v in sorted(notes.items())]


def environment_table(env: dict[str, Any]) -> str:
    flat = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in env.items()}
    return markdown(pd.DataFrame({"key": list(flat), "value": [str(v) for v in flat.values()]}))


SCALING_NOTE = (
    "Each process trains on its own device (on the CPU, on its share of the cores) with its own shard of every "
    "global batch: batch per process x processes. Per device: the largest of the ranks' peaks, what must fit; all "
    "devices: their sum, what the cell costs. Throughput counts every rank's samples per step of the slowest rank; "
    "scaling efficiency = throughput(N) / (N x throughput of the same method in one process)."
)

CPU_SCALING_NOTE = (
    " On the CPU the ranks share one set of cores (each gets cores / N threads), so N times the one-process "
    "throughput is out of reach: there, 1/N is what perfect scaling reads as, and the figure measures the cost of "
    "the collectives and of the smaller per-process batches."
)

RANDOM_WEIGHTS_NOTE = (
    "The weights are random (built from the configuration), so LoRA here adapts a frozen *random* network: "
    "its quality says what a low-rank update can do on top of noise, not what it does on a pretrained model. "
    "Parameter, memory and time figures do not depend on the weights; for quality, run with "
    "`--weights pretrained` (and real data, `--data`)."
)

READING_NOTES = """\
How to read these figures (every row's definition: docs/metrics.md, or `lorabench list --metrics`):
- **Delta** is the reduction relative to full fine-tuning, as in the published tables: 99% fewer
  trainable parameters, 20% less time. For accuracy it is the difference in points, for loss the difference.
- **peak torch allocated / reserved** (GPU only) come from torch's caching allocator, peaks reset after the
  weights and data were placed on the device; reserved adds the allocator's cached free blocks. Neither includes
  the CUDA/HIP context, which only the driver sees.
- **peak host RSS** is the resident memory of the cell's own process (sampled every 10 ms): on the CPU it includes
  the Python interpreter and the torch/transformers libraries (several hundred MiB), so it understates
  relative savings. **above weights+data** subtracts the reading taken once the model and data were in place.
- **weights + grads + optimizer state** sums the tensors themselves (4 + 4 + 8 bytes per trainable fp32 parameter with Adam,
  4 per frozen one): what LoRA saves before activations.
- **activations saved for backward** is what autograd keeps from the first forward pass (saved-tensor hooks,
  parameters and the resident data left out), exact on every device. LoRA by re-parametrization also keeps the
  materialised W + BA of each adapted layer whose input needs a gradient; PEFT's side path does not.
- **epoch time** is wall time between device synchronisations, warm-up epochs excluded; the step times
  time each optimizer step (CUDA events on a GPU), and throughput is samples per step / median step time.
- **NVML / amdsmi** figures are the driver's view: this process's GPU memory (CUDA context included) and the
  device's used memory (every process on it). They are higher than the allocator's by the context and by
  anything else on the device.
- **model FLOPs utilisation** divides the training FLOPs of a step (counted by torch's FlopCounterMode on the
  meta device: the matrix products of forward and backward) by its median time and by the best matmul rate
  measured at the start of the run, in the cell's dtype, on the model's own GEMM shapes and a square one. Above
  100 % it is not shown: the reading is listed under "Figures not available" as a measurement problem.
"""


def _group_title(cell: Cell, same_model: list[Cell]) -> str:
    """The section's title: the model, and the values that set its table apart from the model's others."""
    fields = [f for f in varying(same_model) if AXES[f].grouped]
    return cell.model + (
        f" ({', '.join(f'{AXES[f].title} {getattr(cell, f)}' for f in fields)})" if fields else ""
    )


def _model_section(
    cell: Cell,
    variants: list[Variant],
    plot_dir,
    plot_link: str,
    line: str | None,
    title: str | None = None,
    goal: Goal = Goal(),
) -> list[str]:
    """A model's section, opening with its headline `line` (None: none)."""
    out = [f"## {title or cell.model}", ""]
    if line:
        out += [f"**{line}**", ""]
    out += [_settings_line(cell, variants), ""]
    if not any(v.ok for v in variants):
        return out + ["No cell of this model finished.", ""]
    out += [comparison_table(variants), ""]
    if plot_dir is not None:
        out += memory_picture(cell, variants, plot_dir, plot_link)
    spread = [(v.label, v.epoch_summary) for v in variants if v.ok and v.epoch_summary and v.repeats > 1]
    if spread:
        out += [
            "Spread of epoch time across repeats: "
            + "; ".join(
                f"{label}: median {s.median:.3f} s, stdev {s.stdev_pct:.1f}% (n={s.n})" for label, s in spread
            ),
            "",
        ]
    if len({v.cell.rank for v in variants if v.ok and v.cell.rank}) >= 2:
        out += ["### Rank sweep", "", rank_sweep_table(variants), ""]
        if plot_dir is not None:
            from .plots import rank_sweep_plot

            name = plot_name(cell, "rank-sweep")
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
            rank_sweep_plot(
                cell.model, [v for v in variants if v.ok], Path(plot_dir) / name, memory_key(variants)
            )
            out += [
                f"![{cell.model}: peak memory, epoch time and accuracy against rank]({plot_link}{name})",
                "",
            ]
    if len({v.cell.nproc for v in variants if v.ok}) >= 2:
        note = SCALING_NOTE + (CPU_SCALING_NOTE if not cell.on_gpu else "")
        out += ["### Scaling across processes", "", scaling_table(variants), "", note, ""]
        if plot_dir is not None:
            from .plots import scaling_plot

            name = plot_name(cell, "scaling")
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
            scaling_plot(
                cell.model, [v for v in variants if v.ok], Path(plot_dir) / name, memory_key(variants)
            )
            out += [
                f"![{cell.model}: per-device peak memory and throughput against processes]({plot_link}{name})",
                "",
            ]
    if quality.worth_showing(variants):
        out += [
            "### Quality",
            "",
            quality.quality_table(variants, goal),
            "",
            quality.notes(variants, goal),
            "",
        ]
        if plot_dir is not None:
            out += quality.curve_picture(variants, plot_dir, plot_link, goal)
            out += quality.pareto_picture(variants, plot_dir, plot_link, goal)
    table = epochs_table(variants)
    if table:
        out += ["### Quality per epoch (eval set)", "", table, ""]
        if not cell.pretrained and any(not v.cell.is_baseline for v in variants):
            out += [RANDOM_WEIGHTS_NOTE, ""]
    table = prediction_table(variants)
    if table:
        out += [
            "### Memory: predicted before the run vs measured",
            "",
            table,
            "",
            "Saved activations are counted exactly, on every device, by saved-tensor hooks around the "
            "first forward pass. Activations + temporaries at the peak come from the torch allocator on "
            "a GPU and from sampled host RSS on the CPU (coarse: the allocator's and the interpreter's "
            "own growth land there too); total = weights + gradients + optimizer state + that peak figure.",
            "",
        ]
    return out


def write(
    rows: list[Row],
    path: Path,
    warnings: Iterable[str] = (),
    headline_by: str = "memory",
    run_dirs: Iterable[Path] = (),
    goal: Goal = Goal(),
) -> Path:
    """Write the report of `rows` to `path`, its plots in the folder beside it named after it;
    `run_dirs` hold the rows' timelines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        render(
            rows,
            warnings,
            plot_dir=path.parent / path.stem,
            plot_link=f"{path.stem}/",
            headline_by=headline_by,
            run_dirs=run_dirs,
            goal=goal,
        ),
        encoding="utf-8",
    )
    return path


def render(
    rows: list[Row],
    warnings: Iterable[str] = (),
    plot_dir=None,
    plot_link: str = "",
    headline_by: str = "memory",
    run_dirs: Iterable[Path] = (),
    goal: Goal = Goal(),
) -> str:
    """The report of `rows`: headlines, a section per model and its tables, pictures (in `plot_dir`,
    linked as `plot_link`), failures and the environment; quality's time to target against `goal`'s."""
    run_ids = sorted({r.run_id for r in rows})
    statuses: dict[str, int] = defaultdict(int)
    for r in rows:
        statuses[r.status.value] += 1
    out = [f"# lorabench report: {', '.join(run_ids) or 'no rows'}", ""]
    sections = [(cell, variants, headline(variants, headline_by, goal)) for cell, variants in groups(rows)]
    lines = [line for _, _, line in sections if line]
    for model in dict.fromkeys(c.model for c, _, _ in sections):  # full fine-tuning with savers too
        line = against_leanest_full([v for c, vs, _ in sections if c.model == model for v in vs])
        lines += [line] if line else []
    out += [f"- {line}" for line in lines] + ([""] if lines else [])
    out.append(
        f"{len(rows)} result rows: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + "."
    )
    out.append("")
    for cell, variants, line in sections:
        same_model = [c for c, _, _ in sections if c.model == cell.model]
        out += _model_section(cell, variants, plot_dir, plot_link, line, _group_title(cell, same_model), goal)
        picture = (
            timeline_picture(cell, variants, plot_dir, plot_link, list(run_dirs))
            if plot_dir is not None
            else []
        )
        out += ["### Memory over time", ""] + picture if picture else []
    for model in dict.fromkeys(r.cell.model for r in rows):  # memory against a size axis, across its tables
        mine = [v for c, vs, _ in sections if c.model == model for v in vs if v.ok]
        for field, label in (("seq_len", "sequence length (tokens)"), ("batch_size", "batch size (samples)")):
            if len({getattr(v.cell, field) for v in mine}) > 1 and plot_dir is not None:
                out += [f"## {model}: memory against {label}", ""]
                out += axis_picture(model, mine, field, label, plot_dir, plot_link)
    axes = [f for f in varying([r.cell for r in rows]) if f != "rank"] + (
        ["method"] if len({r.cell.method_label for r in rows}) > 1 else []
    )
    if len(axes) > 2:  # many axes: one line per cell as well
        out += ["## Every cell", "", long_table(rows), ""]
    failures = _failures(rows)
    if failures:
        out += ["## Cells that did not finish", "", failures, ""]
    notes = _unavailable_notes(rows)
    if notes:
        out += ["## Figures not available", ""] + notes + [""]
    if warnings:
        out += ["## Warnings reading the results", ""] + [f"- {w}" for w in warnings] + [""]
    env = next((r.environment for r in rows if r.environment), None)
    if env:
        out += ["## Environment", "", environment_table(env), ""]
    out += ["## Reading the tables", "", READING_NOTES]
    return "\n".join(out)


WIDTH = 120  # the terminal's lines are at most this long


def summary(rows: list[Row], headline_by: str = "memory", goal: Goal = Goal()) -> str:
    """What `lorabench run` prints at its end: per model, the answers (trainable share, memory and
    time saved, quality, the prediction's error) and its headline, in lines of at most WIDTH
    columns; every other figure is in the report."""
    import textwrap

    out = []
    sections = groups(rows)
    for cell, variants in sections:
        title = _group_title(cell, [c for c, _ in sections if c.model == cell.model])
        out += [f"{title} ({cell.device}, {cell.weights} weights)"]
        if any(v.ok for v in variants):
            out += [answers_table(variants)]
        line = headline(variants, headline_by, goal)
        out += textwrap.wrap(line, WIDTH) if line else []
        out += [""]
    bad = [r for r in rows if not r.ok]
    if bad:
        out += ["Cells that did not finish:"]
        for r in bad:
            why = f"{(r.error or {}).get('type', '')}: {(r.error or {}).get('message', '')}"
            out += textwrap.wrap(
                f"- {r.cell.model} {r.label}: {r.status.value}, {why}", WIDTH, subsequent_indent="  "
            )
        out += [""]
    return "\n".join(out)
