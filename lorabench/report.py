"""Markdown reports from result rows: the only module that turns numbers into text.

    lorabench report results/<run-id>       # writes report/<run-id>.md and prints it

Tables are pandas DataFrames rendered as GitHub-flavoured markdown. Per model, the comparison
follows the seed tables: one row per figure, a column for full fine-tuning and for each LoRA
configuration, and a Delta column after each giving the reduction relative to full (positive:
LoRA needs less). Repeats of a cell are folded into their median, with the spread shown.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any, Iterable

import pandas as pd

from .stats import Summary
from .trackers import is_unavailable

MiB = 2 ** 20

# (metric key, row label, kind). kind picks formatting and how the Delta reads.
#   count/bytes/time: Delta = reduction vs full in %;  rate: Delta = gain in %;  acc: points;  loss: difference
COMPARISON_ROWS = [
    ("params_trainable", "trainable parameters", "count"),
    ("params_trainable_adapter", "  of which adapters (LoRA A, B)", "count"),
    ("params_trainable_full", "  of which trained in full (heads, saved modules)", "count"),
    ("params_trainable_pct", "trainable % of total", "pct"),
    ("params_total", "total parameters", "count"),
    ("torch_peak_allocated_bytes", "peak torch allocated (MiB, framework)", "bytes"),
    ("torch_peak_reserved_bytes", "peak torch reserved (MiB, framework)", "bytes"),
    ("torch_peak_above_baseline_bytes", "peak torch allocated above weights+data (MiB)", "bytes"),
    ("nvml_process_peak_bytes", "peak GPU memory of the process (MiB, NVML: driver, CUDA context included)", "bytes"),
    ("nvml_device_used_peak_bytes", "peak GPU memory used on the device (MiB, NVML: every process)", "bytes"),
    ("nvml_device_used_before_bytes", "GPU memory used before the cell (MiB, NVML: others' load)", "bytes"),
    ("amdsmi_process_peak_bytes", "peak VRAM of the process (MiB, amdsmi: driver)", "bytes"),
    ("amdsmi_device_vram_used_peak_bytes", "peak VRAM used on the device (MiB, amdsmi: every process)", "bytes"),
    ("host_peak_rss_bytes", "peak host RSS of the cell process (MiB)", "bytes"),
    ("host_peak_above_baseline_bytes", "host RSS peak above weights+data (MiB)", "bytes"),
    ("state_bytes", "weights + grads + Adam state (MiB, tensor sum)", "bytes"),
    ("activations_saved_bytes", "activations saved for backward (MiB, saved-tensor hooks)", "bytes"),
    ("activations_bytes", "activations + temporaries (MiB, peak less weights, grads, Adam)", "bytes"),
    ("epoch_s", "epoch time (s, median of timed epochs)", "time"),
    ("step_s_p50", "step time p50 (ms)", "ms"),
    ("step_s_p90", "step time p90 (ms)", "ms"),
    ("samples_per_s", "throughput (samples/s)", "rate"),
    ("mfu_pct", "model FLOPs utilisation (% of the measured matmul rate)", "pct"),
    ("energy_j_per_epoch", "energy per timed epoch (J)", "joules"),
    ("final_eval_accuracy", "final eval accuracy", "acc"),
    ("final_eval_loss", "final eval loss", "loss"),
    ("checkpoint_bytes", "checkpoint to store (full model / adapter file)", "size"),
    ("predicted_total_bytes", "predicted: weights+grads+Adam+activations (MiB)", "bytes"),
    ("check_merged_vs_adapter_max_abs_diff", "check: merged vs adapter outputs, max abs diff", "sci"),
    ("check_adapter_off_vs_base_max_abs_diff", "check: adapter off vs base outputs, max abs diff", "sci"),
]

# Fields that may differ between the columns of one comparison table (the method's own settings).
GROUP_FIELDS_EXCLUDED = ("method", "rank", "alpha", "dropout", "targets", "modules_to_save", "repeat", "lr",
                         "pretrain_epochs")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _size(value: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:.0f} B"


FORMATS = {
    "count": lambda v: f"{int(round(v)):,}",
    "pct": lambda v: f"{v:.3g}%",
    "bytes": lambda v: f"{v / MiB:,.1f}",          # shown in MiB; the results keep bytes
    "time": lambda v: f"{v:.3f}" if v < 10 else f"{v:,.1f}",
    "ms": lambda v: f"{v * 1e3:.2f}",
    "rate": lambda v: f"{v:,.0f}",
    "acc": lambda v: f"{v:.4f}",
    "loss": lambda v: f"{v:.4f}",
    "sci": lambda v: f"{v:.1e}",
    "joules": lambda v: f"{v:,.1f}",
    "size": _size,
}


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if is_unavailable(value):
        return "unavailable"
    if not _num(value):
        return str(value)
    return FORMATS[kind](value)


def delta(full: Any, other: Any, kind: str) -> str:
    """The seed tables' Delta: reduction relative to full fine-tuning."""
    if not (_num(full) and _num(other)):
        return ""
    if kind == "acc":
        return f"{(other - full) * 100:+.1f} pt"
    if kind == "loss":
        return f"{other - full:+.4f}"
    if kind in ("pct", "sci") or full == 0:
        return ""
    if kind == "rate":
        return f"{(other - full) / full * 100:+.1f}% faster" if other >= full else f"{(other - full) / full * 100:.1f}% slower"
    return f"{(full - other) / full * 100:.2f}%"


# ---- folding rows --------------------------------------------------------------------------

def _group_key(cell: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in cell.items() if k not in GROUP_FIELDS_EXCLUDED}, sort_keys=True)


def _variant_key(cell: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in cell.items() if k != "repeat"}, sort_keys=True)


def fold(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold repeats of one cell: numeric metrics -> median, plus a Summary of epoch_s."""
    ok = [r for r in rows if r["status"] == "ok"]
    first = (ok or rows)[0]
    metrics: dict[str, Any] = {}
    if ok:
        for key, value in ok[0]["metrics"].items():
            values = [r["metrics"].get(key) for r in ok]
            metrics[key] = Summary.of(values).median if all(_num(v) for v in values) else value
        m = metrics
        if all(_num(m.get(k)) for k in ("weights_bytes", "grads_bytes", "optimizer_state_bytes")):
            m["state_bytes"] = m["weights_bytes"] + m["grads_bytes"] + m["optimizer_state_bytes"]
        spread = [r["metrics"]["epoch_s"] for r in ok if _num(r["metrics"].get("epoch_s"))]
        metrics["_epoch_summary"] = Summary.of(spread) if spread else None
    return {"cell": first["cell"], "label": first["label"], "status": first["status"] if not ok else "ok",
            "metrics": metrics, "repeats": len(ok), "rows": rows}


def _order(label_cell: dict[str, Any]) -> tuple:
    c = label_cell
    return (c["method"] != "full", c["method"], c["rank"] or 0, str(c.get("alpha")), str(c.get("targets")))


def groups(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """[(shared cell settings, [folded variant, ...])], one group per comparison table."""
    by_variant: dict[str, list] = defaultdict(list)
    for r in rows:
        by_variant[_variant_key(r["cell"])].append(r)
    by_group: dict[str, list] = defaultdict(list)
    for variant_rows in by_variant.values():
        folded = fold(variant_rows)
        by_group[_group_key(folded["cell"])].append(folded)
    out = []
    for variants in by_group.values():
        variants.sort(key=lambda v: _order(v["cell"]))
        out.append((variants[0]["cell"], variants))
    out.sort(key=lambda g: (g[0]["model"], _group_key(g[0])))
    return out


# ---- tables --------------------------------------------------------------------------------

def _markdown(df: pd.DataFrame, numeric_cols: Iterable[str] = ()) -> str:
    numeric = set(numeric_cols)
    align = ["right" if c in numeric else "left" for c in df.columns]
    return df.to_markdown(index=False, colalign=align, disable_numparse=True)   # cells are formatted already


def _column_name(v: dict[str, Any]) -> str:
    name = v["label"]
    c = v["cell"]
    if c["rank"] is not None and c.get("alpha") is not None and c["alpha"] != c["rank"]:
        name += f" a={c['alpha']:g}"
    if c.get("pretrain_epochs"):
        name += f" after {c['pretrain_epochs']} full epochs"
    if v["repeats"] > 1:
        name += f" (x{v['repeats']})"
    return name


def comparison_table(variants: list[dict[str, Any]]) -> str:
    """Rows: figures; columns: full, then each LoRA variant with its Delta vs full."""
    ok = [v for v in variants if v["status"] == "ok"]
    full = next((v for v in ok if v["cell"]["method"] == "full"), None)
    columns: dict[str, list[str]] = {"Comparison": []}
    numeric_cols = []
    present = [(k, label, kind) for k, label, kind in COMPARISON_ROWS
               if any(_num(v["metrics"].get(k)) for v in ok)]
    columns["Comparison"] = [label for _, label, _ in present]
    for v in ok:
        name = _column_name(v)
        columns[name] = [fmt(v["metrics"].get(k), kind) for k, _, kind in present]
        numeric_cols.append(name)
        if v is not full and full is not None:
            dname = f"Delta {name}"
            columns[dname] = [delta(full["metrics"].get(k), v["metrics"].get(k), kind) for k, _, kind in present]
            numeric_cols.append(dname)
    if full is not None:   # seed layout: full first
        order = ["Comparison", _column_name(full)] + [c for c in columns if c not in ("Comparison", _column_name(full))]
        columns = {c: columns[c] for c in order}
    return _markdown(pd.DataFrame(columns), numeric_cols)


# (row, predicted figure, measured figure); the measured total sums every row but the saved
# activations, which the peak-based activations + temporaries already contain
PREDICTION_ROWS = [
    ("weights", "predicted_weights_bytes", "weights_bytes"),
    ("gradients", "predicted_grads_bytes", "grads_bytes"),
    ("Adam state", "predicted_optimizer_bytes", "optimizer_state_bytes"),
    ("activations saved for backward", "predicted_activations_bytes", "activations_saved_bytes"),
    ("activations + temporaries at the peak", None, "activations_bytes"),
]


def prediction_table(variants: list[dict[str, Any]]) -> str:
    """Predicted (closed form, before the run) vs measured memory, MiB, per variant."""
    ok = [v for v in variants if v["status"] == "ok" and _num(v["metrics"].get("predicted_total_bytes"))]
    if not ok:
        return ""
    cols: dict[str, list[str]] = {"memory (MiB)": [label for label, _, _ in PREDICTION_ROWS] + ["total"]}
    for v in ok:
        m, name = v["metrics"], _column_name(v)
        pred = [m.get(p) if p else None for _, p, _ in PREDICTION_ROWS]
        meas = [m.get(k) for _, _, k in PREDICTION_ROWS]
        cols[f"{name} predicted"] = [fmt(x, "bytes") for x in pred] + [fmt(m["predicted_total_bytes"], "bytes")]
        peak_parts = [m.get(k) for _, _, k in PREDICTION_ROWS if k != "activations_saved_bytes"]
        total = sum(peak_parts) if all(_num(x) for x in peak_parts) else None
        cols[f"{name} measured"] = [fmt(x, "bytes") for x in meas] + [fmt(total, "bytes")]
    return _markdown(pd.DataFrame(cols), [c for c in cols if c != "memory (MiB)"])


def epochs_table(variants: list[dict[str, Any]]) -> str:
    """Loss and accuracy per epoch for each variant (first repeat), as seed 003's table."""
    frames = []
    for v in variants:
        if v["status"] != "ok":
            continue
        ok_rows = [r for r in v["rows"] if r["status"] == "ok"]
        recs = ok_rows[0]["metrics"].get("epochs", [])
        name = _column_name(v)
        frames.append(pd.DataFrame({
            "epoch": [e["epoch"] for e in recs],
            f"{name} loss": [f"{e['eval_loss']:.4f}" for e in recs],
            f"{name} acc": [f"{e['eval_accuracy']:.4f}" for e in recs],
        }).set_index("epoch"))
    if not frames:
        return ""
    df = pd.concat(frames, axis=1).reset_index()
    timed = {e["epoch"]: e["timed"] for v in variants if v["status"] == "ok"
             for e in v["rows"][0]["metrics"].get("epochs", [])}
    df["epoch"] = [f"{e}" if timed.get(e, True) else f"{e} (warm-up)" for e in df["epoch"]]
    return _markdown(df.fillna(""), [c for c in df.columns if c != "epoch"])


def plan_table(cells, surveys, skipped: dict[str, str] | None = None) -> str:
    """The dry-run plan: every cell with its exact parameter counts and predicted need."""
    counts = [s.params for s in surveys]
    df = pd.DataFrame({
        "#": list(range(1, len(cells) + 1)),
        "model": [c.model for c in cells],
        "method": [c.label for c in cells],
        "trainable": [fmt(p.trainable, "count") for p in counts],
        "adapters": [fmt(p.adapter, "count") for p in counts],
        "trained in full": [fmt(p.full_trained, "count") for p in counts],
        "total": [fmt(p.total, "count") for p in counts],
        "trainable %": [f"{p.trainable_pct:.3f}%" for p in counts],
        "predicted memory (MiB)": [fmt(s.prediction.total_bytes, "bytes") for s in surveys],
        "GFLOP/step": [f"{s.prediction.flops_per_step / 1e9:,.2f}" for s in surveys],
        "batch": [c.batch_size if c.grad_accum == 1 else f"{c.batch_size}x{c.grad_accum}" for c in cells],
        "samples": [c.samples for c in cells],
        "epochs (warm-up+timed)": [f"{c.warmup_epochs}+{c.epochs}" for c in cells],
        "device": [c.device + (" (skipped)" if skipped and c.key() in skipped else "") for c in cells],
    })
    return _markdown(df, ["#", "trainable", "adapters", "trained in full", "total", "trainable %",
                          "predicted memory (MiB)", "GFLOP/step", "batch", "samples"])


def _settings_line(cell: dict[str, Any], variants) -> str:
    data = next((v["metrics"].get("data") for v in variants if v["metrics"].get("data")), cell.get("data"))
    accum = f" x {cell['grad_accum']} accumulated" if cell.get("grad_accum", 1) > 1 else ""
    lrs = {v["label"]: v["cell"]["lr"] for v in variants}
    lr = (f"{cell['lr']:g}" if len(set(lrs.values())) == 1
          else ", ".join(f"{lr_:g} ({label})" for label, lr_ in lrs.items()))
    return (f"Device `{cell['device']}` ({cell['dtype']}), weights: {cell['weights']}, data: {data}; "
            f"batch {cell['batch_size']}{accum}, {cell['samples']} training / {cell['eval_samples']} eval samples, "
            f"{cell['warmup_epochs']} warm-up + {cell['epochs']} timed epochs, Adam lr {lr}, seed {cell['seed']}.")


def _failures(rows: list[dict[str, Any]]) -> str:
    bad = [r for r in rows if r["status"] != "ok"]
    if not bad:
        return ""
    df = pd.DataFrame({
        "model": [r["cell"]["model"] for r in bad],
        "method": [r["label"] for r in bad],
        "repeat": [r["cell"].get("repeat", 0) for r in bad],
        "status": [r["status"] for r in bad],
        "reason": [f"{(r.get('error') or {}).get('type', '')}: {(r.get('error') or {}).get('message', '')}"
                   .replace("|", "\\|") for r in bad],
    })
    return _markdown(df)


def _unavailable_notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = {}
    for r in rows:
        for k, v in r.get("metrics", {}).items():
            if is_unavailable(v):
                notes.setdefault(k, v)
    return [f"- `{k}`: {v}" for k, v in sorted(notes.items())]


def environment_table(env: dict[str, Any]) -> str:
    flat = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in env.items()}
    return _markdown(pd.DataFrame({"key": list(flat), "value": [str(v) for v in flat.values()]}))


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
- **model FLOPs utilisation** divides the predicted training FLOPs of a step by its median time and by the
  matmul rate measured on the same device at the start of the run.
"""


def _memory_key(variants) -> tuple[str, str]:
    """The peak memory figure the sweep plots: the allocator's on a GPU, host RSS on the CPU."""
    if any(_num(v["metrics"].get("torch_peak_allocated_bytes")) for v in variants):
        return "torch_peak_allocated_bytes", "peak torch allocated (MiB)"
    return "host_peak_rss_bytes", "peak host RSS (MiB)"


def rank_sweep_table(variants: list[dict[str, Any]]) -> str:
    """One row per rank (full first), per LoRA method: trainable parameters, memory, time, quality."""
    ok = [v for v in variants if v["status"] == "ok"]
    mem_key, mem_label = _memory_key(ok)
    df = pd.DataFrame({
        "method": [v["cell"]["method"] for v in ok],
        "rank": [str(v["cell"]["rank"]) if v["cell"]["rank"] else "-" for v in ok],
        "trainable": [fmt(v["metrics"].get("params_trainable"), "count") for v in ok],
        mem_label: [fmt(v["metrics"].get(mem_key), "bytes") for v in ok],
        "weights + grads + Adam (MiB)": [fmt(v["metrics"].get("state_bytes"), "bytes") for v in ok],
        "epoch time (s)": [fmt(v["metrics"].get("epoch_s"), "time") for v in ok],
        "final accuracy": [fmt(v["metrics"].get("final_eval_accuracy"), "acc") for v in ok],
    })
    return _markdown(df, [c for c in df.columns if c not in ("method", "rank")])


def rank_sweep_plot(model: str, variants: list[dict[str, Any]], path) -> None:
    """Peak memory, epoch time and final accuracy against rank, full fine-tuning as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")   # no display: render to a file
    import matplotlib.pyplot as plt

    ok = [v for v in variants if v["status"] == "ok"]
    mem_key, mem_label = _memory_key(ok)
    panels = [(mem_key, mem_label, 1 / MiB), ("epoch_s", "epoch time (s)", 1.0),
              ("final_eval_accuracy", "final eval accuracy", 1.0)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    full = next((v for v in ok if v["cell"]["method"] == "full"), None)
    for ax, (key, label, scale) in zip(axes, panels):
        for method in sorted({v["cell"]["method"] for v in ok} - {"full"}):
            pts = sorted((v["cell"]["rank"], v["metrics"][key] * scale) for v in ok
                         if v["cell"]["method"] == method and _num(v["metrics"].get(key)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if full is not None and _num(full["metrics"].get(key)):
            ax.axhline(full["metrics"][key] * scale, linestyle="--", color="black", label="full fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: LoRA rank sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(rows: list[dict[str, Any]], warnings: Iterable[str] = (), plot_dir=None, plot_link: str = "") -> str:
    run_ids = sorted({r["run_id"] for r in rows})
    statuses = defaultdict(int)
    for r in rows:
        statuses[r["status"]] += 1
    out = [f"# lorabench report: {', '.join(run_ids) or 'no rows'}", ""]
    out.append(f"{len(rows)} result rows: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ".")
    out.append("")
    for cell, variants in groups(rows):
        out += [f"## {cell['model']}", "", _settings_line(cell, variants), ""]
        if any(v["status"] == "ok" for v in variants):
            out += [comparison_table(variants), ""]
            spread = [(v["label"], v["metrics"]["_epoch_summary"]) for v in variants
                      if v["status"] == "ok" and v["metrics"].get("_epoch_summary") and v["repeats"] > 1]
            if spread:
                out += ["Spread of epoch time across repeats: " + "; ".join(
                    f"{label}: median {s.median:.3f} s, stdev {s.stdev_pct:.1f}% (n={s.n})" for label, s in spread), ""]
            ranks = {v["cell"]["rank"] for v in variants if v["status"] == "ok" and v["cell"]["rank"]}
            if len(ranks) >= 2:
                out += ["### Rank sweep", "", rank_sweep_table(variants), ""]
                if plot_dir is not None:
                    from pathlib import Path
                    import hashlib
                    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cell["model"])
                    name = f"{slug}-{hashlib.sha1(_group_key(cell).encode()).hexdigest()[:6]}-rank-sweep.png"
                    Path(plot_dir).mkdir(parents=True, exist_ok=True)
                    rank_sweep_plot(cell["model"], variants, Path(plot_dir) / name)
                    out += [f"![{cell['model']}: peak memory, epoch time and accuracy against rank]({plot_link}{name})", ""]
            table = epochs_table(variants)
            if table:
                out += ["### Quality per epoch (eval set)", "", table, ""]
                if cell["weights"] == "random" and any(v["cell"]["method"] != "full" for v in variants):
                    out += [RANDOM_WEIGHTS_NOTE, ""]
            table = prediction_table(variants)
            if table:
                out += ["### Memory: predicted before the run vs measured", "", table, "",
                        "Saved activations are counted exactly, on every device, by saved-tensor hooks around the "
                        "first forward pass. Activations + temporaries at the peak come from the torch allocator on "
                        "a GPU and from sampled host RSS on the CPU (coarse: the allocator's and the interpreter's "
                        "own growth land there too); total = weights + gradients + Adam state + that peak figure.",
                        ""]
        else:
            out += ["No cell of this model finished.", ""]
    failures = _failures(rows)
    if failures:
        out += ["## Cells that did not finish", "", failures, ""]
    notes = _unavailable_notes(rows)
    if notes:
        out += ["## Figures not available", ""] + notes + [""]
    if warnings:
        out += ["## Warnings reading the results", ""] + [f"- {w}" for w in warnings] + [""]
    env = next((r["environment"] for r in rows if r.get("environment")), None)
    if env:
        out += ["## Environment", "", environment_table(env), ""]
    out += ["## Reading the tables", "", READING_NOTES]
    return "\n".join(out)


def summary(rows: list[dict[str, Any]]) -> str:
    """The comparison tables alone, for the end of `lorabench run`."""
    out = []
    for cell, variants in groups(rows):
        out += [f"{cell['model']}  ({cell['device']}, {cell['weights']} weights)", ""]
        if any(v["status"] == "ok" for v in variants):
            out += [comparison_table(variants), ""]
    failures = _failures(rows)
    if failures:
        out += ["Cells that did not finish:", "", failures, ""]
    return "\n".join(out)


# ---- compare -------------------------------------------------------------------------------

def comparison_report(cmp, base_name: str, new_name: str) -> str:
    """The change of every figure of every matched cell, regressions flagged."""
    out = [f"# lorabench compare: {base_name} -> {new_name}", ""]
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
        out += [_markdown(df, ["base", "new", "change", "limit"]), ""]
    for title, cells in (("Only in the base run", cmp.only_in_base), ("Only in the new run", cmp.only_in_new)):
        if cells:
            out += [f"{title}: " + ", ".join(cells), ""]
    return "\n".join(out)


def _fmt_any(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v:,.0f}"
    return f"{v:.4g}"


# ---- pytest-benchmark -----------------------------------------------------------------------

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
        out += [_markdown(df, ["trainable", "min (ms)", "median (ms)", "mean (ms)", "stddev (ms)", "rounds",
                               "peak memory (MiB)"]), ""]
    return "\n".join(out)
