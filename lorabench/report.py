"""Markdown reports from result rows: the only place (with `tables`) that turns numbers into text.

    lorabench report results/<run-id>       # writes report/<run-id>.md and prints it

A report has one section per model: the comparison table (one row per figure of `rows.METRICS`
that was measured), a rank sweep with its plot, quality per epoch, and predicted vs measured
memory; then failed cells, figures not available with their reasons, and the environment.
`tables` builds each table; this module lays them out, and renders `compare` and
pytest-benchmark results the same way.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .cells import Cell
from .headlines import headline
from .plots import axis_picture, memory_picture, plot_name, timeline_picture
from .rows import METRICS, Row
from .tables import (AXIS_NAMES, GROUP_FIELDS_EXCLUDED, Variant, comparison_table, epochs_table, fmt,
                     groups, long_table, markdown, memory_key, prediction_table, rank_sweep_table,
                     scaling_table, varying)


def _settings_line(cell: Cell, variants: list[Variant]) -> str:
    data = next((v.info.get("data") for v in variants if v.ok and v.info.get("data")), cell.data)
    accum = f" x {cell.grad_accum} accumulated" if cell.grad_accum > 1 else ""
    lrs = {v.label: v.cell.lr for v in variants}
    lr = (f"{cell.lr:g}" if len(set(lrs.values())) == 1
          else ", ".join(f"{lr_:g} ({label})" for label, lr_ in lrs.items()))
    knobs = cell.precision + (", gradient checkpointing" if cell.grad_checkpointing == "on" else "")
    return (f"Device `{cell.device}` ({knobs}), weights: {cell.weights}, data: {data}; "
            f"batch {cell.batch_size}{accum}, {cell.samples} training / {cell.eval_samples} eval samples, "
            f"{cell.warmup_epochs} warm-up + {cell.epochs} timed epochs, Adam lr {lr}, seed {cell.seed}.")


def _failures(rows: list[Row]) -> str:
    bad = [r for r in rows if not r.ok]
    if not bad:
        return ""
    df = pd.DataFrame({
        "model": [r.cell.model for r in bad],
        "method": [r.label for r in bad],
        "repeat": [r.cell.repeat for r in bad],
        "status": [r.status.value for r in bad],
        "reason": [f"{(r.error or {}).get('type', '')}: {(r.error or {}).get('message', '')}".replace("|", "\\|")
                   for r in bad],
    })
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


def metrics_table() -> str:
    """Every figure a row can hold (rows.METRICS): the README's table of figures is this."""
    gate = {"time": "gated: time", "memory": "gated: memory", "quality": "gated: accuracy points"}
    df = pd.DataFrame({
        "key": [f"`{m.key}`" for m in METRICS],
        "unit": [m.unit for m in METRICS],
        "what it is (report row)": [m.label.strip() + ("" if m.shown else " (row only)")
                                    + (" (derived)" if m.derive else "") for m in METRICS],
        "compare": ["exact: any change is called out" if m.exact else gate.get(m.gate, "") for m in METRICS],
    })
    return markdown(df)


SCALING_NOTE = (
    "Each process trains on its own device (on the CPU, on its share of the cores) with its own shard of every "
    "global batch: batch per process x processes. Per device: the largest of the ranks' peaks, what must fit; all "
    "devices: their sum, what the cell costs. Throughput counts every rank's samples per step of the slowest rank; "
    "scaling efficiency = throughput(N) / (N x throughput of the same method in one process).")

CPU_SCALING_NOTE = (
    " On the CPU the ranks share one set of cores (each gets cores / N threads), so N times the one-process "
    "throughput is out of reach: there, 1/N is what perfect scaling reads as, and the figure measures the cost of "
    "the collectives and of the smaller per-process batches.")

RANDOM_WEIGHTS_NOTE = (
    "The weights are random (built from the configuration), so LoRA here adapts a frozen *random* network: "
    "its quality says what a low-rank update can do on top of noise, not what it does on a pretrained model. "
    "Parameter, memory and time figures do not depend on the weights; for quality, run with "
    "`--weights pretrained` (and real data, `--data`).")

READING_NOTES = """\
How to read these figures:
- **Delta** is the reduction relative to full fine-tuning, as in the published tables: 99% fewer
  trainable parameters, 20% less time. For accuracy it is the difference in points, for loss the difference.
- **peak torch allocated / reserved** (GPU only) come from torch's caching allocator, peaks reset after the
  weights and data were placed on the device; reserved adds the allocator's cached free blocks. Neither includes
  the CUDA/HIP context, which only the driver sees.
- **peak host RSS** is the resident memory of the cell's own process (sampled every 10 ms): on the CPU it includes
  the Python interpreter and the torch/transformers libraries (several hundred MiB), so it understates
  relative savings. **above weights+data** subtracts the reading taken once the model and data were in place.
- **weights + grads + Adam state** sums the tensors themselves (4 + 4 + 8 bytes per trainable fp32 parameter,
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
    fields = [f for f in varying(same_model) if f not in GROUP_FIELDS_EXCLUDED]
    return cell.model + (f" ({', '.join(f'{AXIS_NAMES[f]} {getattr(cell, f)}' for f in fields)})" if fields else "")


def _model_section(cell: Cell, variants: list[Variant], plot_dir, plot_link: str, line: str | None,
                   title: str | None = None) -> list[str]:
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
        out += ["Spread of epoch time across repeats: " + "; ".join(
            f"{label}: median {s.median:.3f} s, stdev {s.stdev_pct:.1f}% (n={s.n})" for label, s in spread), ""]
    if len({v.cell.rank for v in variants if v.ok and v.cell.rank}) >= 2:
        out += ["### Rank sweep", "", rank_sweep_table(variants), ""]
        if plot_dir is not None:
            from .plots import rank_sweep_plot
            name = plot_name(cell, "rank-sweep")
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
            rank_sweep_plot(cell.model, [v for v in variants if v.ok], Path(plot_dir) / name, memory_key(variants))
            out += [f"![{cell.model}: peak memory, epoch time and accuracy against rank]({plot_link}{name})", ""]
    if len({v.cell.nproc for v in variants if v.ok}) >= 2:
        note = SCALING_NOTE + (CPU_SCALING_NOTE if cell.device == "cpu" else "")
        out += ["### Scaling across processes", "", scaling_table(variants), "", note, ""]
        if plot_dir is not None:
            from .plots import scaling_plot
            name = plot_name(cell, "scaling")
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
            scaling_plot(cell.model, [v for v in variants if v.ok], Path(plot_dir) / name, memory_key(variants))
            out += [f"![{cell.model}: per-device peak memory and throughput against processes]({plot_link}{name})", ""]
    table = epochs_table(variants)
    if table:
        out += ["### Quality per epoch (eval set)", "", table, ""]
        if cell.weights == "random" and any(not v.cell.is_baseline for v in variants):
            out += [RANDOM_WEIGHTS_NOTE, ""]
    table = prediction_table(variants)
    if table:
        out += ["### Memory: predicted before the run vs measured", "", table, "",
                "Saved activations are counted exactly, on every device, by saved-tensor hooks around the "
                "first forward pass. Activations + temporaries at the peak come from the torch allocator on "
                "a GPU and from sampled host RSS on the CPU (coarse: the allocator's and the interpreter's "
                "own growth land there too); total = weights + gradients + Adam state + that peak figure.",
                ""]
    return out


def write(rows: list[Row], path: Path, warnings: Iterable[str] = (), headline_by: str = "memory",
          run_dirs: Iterable[Path] = ()) -> Path:
    """Write the report of `rows` to `path`, its plots in the folder beside it named after it;
    `run_dirs` hold the rows' timelines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(rows, warnings, plot_dir=path.parent / path.stem, plot_link=f"{path.stem}/",
                           headline_by=headline_by, run_dirs=run_dirs), encoding="utf-8")
    return path


def render(rows: list[Row], warnings: Iterable[str] = (), plot_dir=None, plot_link: str = "",
           headline_by: str = "memory", run_dirs: Iterable[Path] = ()) -> str:
    run_ids = sorted({r.run_id for r in rows})
    statuses: dict[str, int] = defaultdict(int)
    for r in rows:
        statuses[r.status.value] += 1
    out = [f"# lorabench report: {', '.join(run_ids) or 'no rows'}", ""]
    sections = [(cell, variants, headline(variants, headline_by)) for cell, variants in groups(rows)]
    lines = [line for _, _, line in sections if line]
    out += [f"- {line}" for line in lines] + ([""] if lines else [])
    out.append(f"{len(rows)} result rows: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ".")
    out.append("")
    for cell, variants, line in sections:
        same_model = [c for c, _, _ in sections if c.model == cell.model]
        out += _model_section(cell, variants, plot_dir, plot_link, line, _group_title(cell, same_model))
        picture = timeline_picture(cell, variants, plot_dir, plot_link, list(run_dirs)) if plot_dir is not None else []
        out += ["### Memory over time", ""] + picture if picture else []
    for model in dict.fromkeys(r.cell.model for r in rows):   # memory against a size axis, across its tables
        mine = [v for c, vs, _ in sections if c.model == model for v in vs if v.ok]
        for field, label in (("seq_len", "sequence length (tokens)"), ("batch_size", "batch size (samples)")):
            if len({getattr(v.cell, field) for v in mine}) > 1 and plot_dir is not None:
                out += [f"## {model}: memory against {label}", ""]
                out += axis_picture(model, mine, field, label, plot_dir, plot_link)
    axes = [f for f in varying([r.cell for r in rows]) if f != "rank"] + (
        ["method"] if len({r.cell.method_label for r in rows}) > 1 else [])
    if len(axes) > 2:   # many axes: one line per cell as well
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


def summary(rows: list[Row], headline_by: str = "memory") -> str:
    """The comparison tables, each followed by its headline, for the end of `lorabench run`."""
    out = []
    for cell, variants in groups(rows):
        out += [f"{cell.model}  ({cell.device}, {cell.weights} weights)", ""]
        if any(v.ok for v in variants):
            out += [comparison_table(variants), ""]
        line = headline(variants, headline_by)
        if line:
            out += [line, ""]
    failures = _failures(rows)
    if failures:
        out += ["Cells that did not finish:", "", failures, ""]
    return "\n".join(out)


# ---- compare -------------------------------------------------------------------------------

def comparison_report(cmp, base_name: str, new_name: str) -> str:
    """The change of every figure of every matched cell, regressions flagged."""
    out = [f"# lorabench compare: {base_name} -> {new_name}", ""]
    if cmp.environment_changes:
        out += ["**The environment changed** (compared anyway, --allow-environment-change): "
                + "; ".join(cmp.environment_changes) + ". Differences below may be the machine's, not the code's.", ""]
    regs = cmp.regressions
    out.append(f"{len(regs)} regression(s) flagged among {len(cmp.changes)} figures compared." if regs
               else f"No regression among {len(cmp.changes)} figures compared.")
    out.append("")
    if cmp.changes:
        def change(c):
            if c.kind == "quality":
                return f"{c.change:+.2f} pt"
            if c.kind == "exact":
                return f"{c.change:+,.0f} (must not change)"
            return f"{c.change:+.1f}%"
        df = pd.DataFrame({
            "model": [c.model for c in cmp.changes],
            "cell": [c.label for c in cmp.changes],
            "figure": [c.figure for c in cmp.changes],
            "base": [_fmt_any(c.base) for c in cmp.changes],
            "new": [_fmt_any(c.new) for c in cmp.changes],
            "change": [change(c) for c in cmp.changes],
            "limit": ["" if c.kind == "exact" else (f"{c.threshold:.1f} pt" if c.kind == "quality" else f"{c.threshold:.1f}%")
                      for c in cmp.changes],
            "verdict": ["REGRESSION" if c.regression else "ok" for c in cmp.changes],
        })
        out += [markdown(df, ["base", "new", "change", "limit"]), ""]
    for title, cells in (("Only in the base run", cmp.only_in_base), ("Only in the new run", cmp.only_in_new)):
        if cells:
            out += [f"{title}: " + ", ".join(cells), ""]
    return "\n".join(out)


def check_table(checks, device: str, seconds: float) -> str:
    """`lorabench check`'s table: check, measured, expected, verdict."""
    df = pd.DataFrame({"check": [c.name for c in checks], "measured": [c.measured for c in checks],
                       "expected": [c.expected for c in checks], "verdict": ["pass" if c.ok else "FAIL" for c in checks]})
    failed = sum(not c.ok for c in checks)
    verdict = "every check passed" if not failed else f"{failed} of {len(checks)} checks FAILED"
    return "\n".join([f"# lorabench check on {device}: {verdict} ({seconds:.1f} s)", "", markdown(df), ""])


def _fmt_any(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v:,.0f}"
    return f"{v:.4g}"


# ---- pytest-benchmark -----------------------------------------------------------------------

def registries() -> str:
    """`lorabench list`: models with their exact parameter counts, methods, presets."""
    from .methods import BASELINE, METHODS
    from .models import MODELS
    from .plan import PRESETS
    from .survey import survey
    out = ["models:"]
    for name, builder in MODELS.items():
        total = survey(Cell(model=name, method=BASELINE)).params.total
        out.append(f"  {name:14s} {total:>15,} parameters  {(builder.__doc__ or '').strip().splitlines()[0]}")
    out += ["  hf:<dir|id>    any transformers model for sequence classification or causal LM", "methods:"]
    out += [f"  {name:14s} {m.description}" for name, m in METHODS.items()]
    out.append("  peft:<path>    any method PEFT knows, as an adapter_config.json (or its folder) sets it; its "
               "target_modules win, its rank is its own (no --ranks)")
    import dataclasses

    from .cells import AXIS_FIELDS, cli_flags
    out.append("axes (a comma-separated list of values makes one cell per value):")
    for f in dataclasses.fields(Cell):
        if f.name in AXIS_FIELDS:
            flag = cli_flags(f)[0]
            out.append(f"  {flag.flag:22s} {flag.metavar}")
    from .distributed import STRATEGIES
    out.append("strategies (--strategy, for cells of --nproc 2 or more):")
    out += [f"  {name:14s} {text}" for name, text in STRATEGIES.items()]
    out.append("presets:")
    for name, matrices in PRESETS.items():
        models = sorted({m for mx in matrices for m in mx.models})
        out.append(f"  {name:14s} {sum(len(mx.cells()) for mx in matrices):3d} cells  models: {', '.join(models)}")
    return "\n".join(out)


def load_pytest_benchmark(path: Path) -> dict[str, Any]:
    """A pytest-benchmark JSON (`--benchmark-json`); InputError when the file is not one."""
    from .errors import InputError
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        benchmarks = data["benchmarks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--pytest-benchmark {path}: not a pytest-benchmark JSON ({e})") from None
    if not isinstance(benchmarks, list):
        raise InputError(f"--pytest-benchmark {path}: 'benchmarks' is not a list")
    return data


def pytest_benchmark_report(data: dict[str, Any]) -> str:
    """Render a pytest-benchmark JSON (`--benchmark-json`) as the same kind of markdown table."""
    machine = data.get("machine_info", {})
    out = ["# lorabench: pytest-benchmark results", "",
           f"{len(data.get('benchmarks', []))} benchmarks, saved {data.get('datetime', '?')}, "
           f"on {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
           f"Python {machine.get('python_version', '?')}.", ""]
    rows = []
    for b in data.get("benchmarks", []):
        st, info = b.get("stats", {}), b.get("extra_info", {})
        cell = info.get("cell", {})
        rows.append({
            "benchmark": b.get("name", ""),
            "group": b.get("group") or "",
            "model": cell.get("model", info.get("model", "")),
            "method": info.get("label", cell.get("method", "")),
            "trainable": fmt(info.get("params_trainable"), "count") if info.get("params_trainable") is not None else "",
            "min (ms)": f"{st['min'] * 1e3:.2f}" if "min" in st else "",
            "median (ms)": f"{st['median'] * 1e3:.2f}" if "median" in st else "",
            "mean (ms)": f"{st['mean'] * 1e3:.2f}" if "mean" in st else "",
            "stddev (ms)": f"{st['stddev'] * 1e3:.2f}" if "stddev" in st else "",
            "rounds": st.get("rounds", ""),
            "peak memory (MiB)": fmt(info.get("peak_memory_bytes"), "bytes") if info.get("peak_memory_bytes") else "",
        })
    if rows:
        df = pd.DataFrame(rows)
        out += [markdown(df, ["trainable", "min (ms)", "median (ms)", "mean (ms)", "stddev (ms)", "rounds",
                               "peak memory (MiB)"]), ""]
    return "\n".join(out)
