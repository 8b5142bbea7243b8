"""Plots for the report: matplotlib figures written as PNG beside the markdown.

    lorabench report results/<run-id>       # draws report/<run-id>/<model>-...-memory.png (and -rank-sweep.png)

Honest axes: memory and time start at zero, every axis names its unit, a log scale appears only
where the data spans a decade or more (and the axis says so), and full fine-tuning is drawn in
the same units as a reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..plan.cells import Cell
from ..results.metrics import is_number
from .tables import Variant, column_name, group_key, memory_key

MiB = 2**20

# The memory breakdown's layers, bottom to top: (label, colour, measured figure, predicted figure).
# Frozen weights are every weight less the trainable ones.
LAYERS = [
    ("frozen weights", "#b0b0b0", "frozen", "predicted_frozen"),
    ("trainable weights", "#4c72b0", "trainable_weights_bytes", "predicted_trainable"),
    ("gradients", "#dd8452", "grads_bytes", "predicted_grads_bytes"),
    ("optimizer state", "#c44e52", "optimizer_state_bytes", "predicted_optimizer_bytes"),
    ("activations saved for backward", "#55a868", "activations_saved_bytes", "predicted_activations_bytes"),
]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    return plt


def breakdown(m: dict, peak_key: str, baseline_key: str) -> dict[str, float] | None:
    """Measured and predicted parts of one variant in bytes (keys of LAYERS; `base`: what the
    baseline reading held beside the weights, the data set and on the CPU the interpreter;
    `rest`: the peak above everything else, the step's temporaries; `peak`), or None when a part
    was not measured."""
    need = (
        "weights_bytes",
        "trainable_weights_bytes",
        "grads_bytes",
        "optimizer_state_bytes",
        "activations_saved_bytes",
    )
    if not all(is_number(m.get(k)) for k in need):
        return None
    parts = {k: m[k] for k in need}
    parts["frozen"] = m["weights_bytes"] - m["trainable_weights_bytes"]
    known = parts["frozen"] + sum(m[k] for k in need[1:])
    parts["peak"] = m.get(peak_key) if is_number(m.get(peak_key)) else None
    baseline = m.get(baseline_key)
    parts["base"] = (
        max(baseline - m["weights_bytes"], 0) if is_number(baseline) and parts["peak"] is not None else 0
    )
    parts["rest"] = max(parts["peak"] - known - parts["base"], 0) if parts["peak"] is not None else 0
    if all(is_number(m.get(k)) for k in ("predicted_weights_bytes", "predicted_grads_bytes")):
        # a trainable parameter has a gradient of its own size: predicted trainable = predicted grads
        parts["predicted_trainable"] = m["predicted_grads_bytes"]
        parts["predicted_frozen"] = m["predicted_weights_bytes"] - m["predicted_grads_bytes"]
        for key in ("predicted_grads_bytes", "predicted_optimizer_bytes", "predicted_activations_bytes"):
            parts[key] = m.get(key) if is_number(m.get(key)) else 0
    return parts


def memory_breakdown_plot(
    model: str, bars: list[tuple[str, dict]], path, rest_labels: tuple[str, str], driver_key: str | None
) -> list[tuple]:
    """One stacked bar per variant (`bars`: (label, its breakdown)), the prediction beside it
    (hatched), what the device measured beyond the parts on top (`rest_labels`: the baseline's
    remainder, then the temporaries up to the peak), and the driver's view as a line on a GPU."""
    plt = pyplot()
    from matplotlib.patches import Patch

    base_label, rest_label = rest_labels
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(bars) + 1.5) + 3.4, 4.6))
    width = 0.38
    for i, (label, parts) in enumerate(bars):
        bottom = 0.0
        for name, colour, key, _ in LAYERS:
            ax.bar(i - width / 2, parts[key] / MiB, width, bottom=bottom, color=colour)
            bottom += parts[key] / MiB
        if parts["peak"] is not None:
            ax.bar(
                i - width / 2, parts["base"] / MiB, width, bottom=bottom, color="#e8e0c8", edgecolor="#999999"
            )
            ax.bar(
                i - width / 2,
                parts["rest"] / MiB,
                width,
                bottom=bottom + parts["base"] / MiB,
                color="#f6f6f6",
                edgecolor="#999999",
                hatch="..",
            )
        if "predicted_trainable" in parts:
            bottom = 0.0
            for name, colour, _, key in LAYERS:
                ax.bar(
                    i + width / 2,
                    parts[key] / MiB,
                    width,
                    bottom=bottom,
                    color=colour,
                    alpha=0.45,
                    hatch="//",
                    edgecolor="white",
                )
                bottom += parts[key] / MiB
        if driver_key and is_number(parts.get("driver")):
            ax.hlines(
                parts["driver"] / MiB, i - width, i + width, colors="black", linestyles="-", linewidth=2
            )
    ax.set_xticks(range(len(bars)), [f"{label}\nmeasured | predicted" for label, _ in bars], fontsize=8)
    ax.set_ylabel("memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    handles = [Patch(color=colour, label=name) for name, colour, _, _ in LAYERS]
    handles.append(Patch(facecolor="#e8e0c8", edgecolor="#999999", label=base_label))
    handles.append(Patch(facecolor="#f6f6f6", edgecolor="#999999", hatch="..", label=rest_label))
    handles.append(
        Patch(facecolor="white", edgecolor="#666666", hatch="//", label="predicted before the run")
    )
    if driver_key:
        from matplotlib.lines import Line2D

        handles.append(
            Line2D([], [], color="black", linewidth=2, label="driver's view of the process (NVML/amdsmi)")
        )
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{model}: where the memory goes (full fine-tuning is the first bar)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)
    return _axes(fig)


def _axes(fig) -> list[tuple]:
    """(y label, y limits, x label, x scale) of each panel: what the tests hold to honest axes."""
    return [(ax.get_ylabel(), ax.get_ylim(), ax.get_xlabel(), ax.get_xscale()) for ax in fig.axes]


def _save(plt, fig, axes, title: str, path) -> list[tuple]:
    """A panel figure's legend (first panel), title and file; the figure closed, its axes returned."""
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return _axes(fig)


def _line(ax, pts: list[tuple], label: str) -> None:
    """One series of (x, y) points, marked, when there is any."""
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)


def _axis(ax, xlabel: str, ylabel: str, ticks=None, ylim: tuple | None = None) -> None:
    """Labels with units, ticks at the values drawn, y from zero (or `ylim`), a light grid."""
    if ticks is not None:
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim) if ylim else ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
    ax.grid(True, alpha=0.3)


def rank_sweep_plot(model: str, ok: list, path, memory: tuple[str, str]) -> list[tuple]:
    """Peak memory, epoch time and final accuracy against rank, full fine-tuning as a dashed line;
    memory and time from zero, accuracy from 0 to 1."""
    plt = pyplot()
    mem_key, mem_label = memory
    panels = [
        (mem_key, mem_label, 1 / MiB),
        ("epoch_s", "epoch time (s)", 1.0),
        ("final_eval_accuracy", "final eval accuracy (fraction)", 1.0),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    full = next((v for v in ok if v.cell.is_baseline), None)
    ranks = sorted({v.cell.rank for v in ok if v.cell.rank})
    log = len(ranks) > 1 and ranks[-1] / ranks[0] >= 10  # a log scale only where the ranks span a decade
    for ax, (key, label, scale) in zip(axes, panels):
        for method in sorted({v.cell.method for v in ok if not v.cell.is_baseline}):
            _line(
                ax,
                sorted(
                    (v.cell.rank, v.metrics[key] * scale)
                    for v in ok
                    if v.cell.method == method and is_number(v.metrics.get(key))
                ),
                method,
            )
        if full is not None and is_number(full.metrics.get(key)):
            ax.axhline(
                full.metrics[key] * scale, linestyle="--", color="black", label=f"{full.label} fine-tuning"
            )
        if log:
            ax.set_xscale("log", base=2)
        _axis(
            ax,
            "LoRA rank" + (" (log scale)" if log else ""),
            label,
            ranks,
            (0, 1.05) if key == "final_eval_accuracy" else None,
        )
    return _save(plt, fig, axes, f"{model}: LoRA rank sweep", path)


def scaling_plot(model: str, ok: list, path, memory: tuple[str, str]) -> list[tuple]:
    """Per-device peak memory and global throughput against the processes of a cell, a line per
    method and strategy (its one-process cell starts every strategy's line); both from zero."""
    plt = pyplot()
    mem_key, mem_label = memory
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    series: dict[str, list] = {}
    for v in ok:
        name = v.cell.method_label
        strategies = (
            [v.cell.strategy]
            if v.cell.nproc > 1
            else sorted({o.cell.strategy for o in ok if o.cell.nproc > 1})
        )
        for strategy in strategies:
            series.setdefault(f"{name}, {strategy}", []).append(v)
    procs = sorted({v.cell.nproc for v in ok})
    for ax, (key, label, scale) in zip(
        axes,
        [
            (mem_key, f"per device: max, {mem_label}", 1 / MiB),
            ("samples_per_s", "throughput, all ranks (samples/s)", 1.0),
        ],
    ):
        for name, vs in sorted(series.items()):
            _line(
                ax,
                sorted((v.cell.nproc, v.metrics[key] * scale) for v in vs if is_number(v.metrics.get(key))),
                name,
            )
        _axis(ax, "processes per cell (one device each)", label, procs)
    return _save(plt, fig, axes, f"{model}: scaling across processes", path)


def timeline_plot(model: str, series: list[tuple[str, dict]], path) -> list[tuple]:
    """Memory against time over each cell's life, full fine-tuning and each LoRA variant overlaid,
    each peak dotted; the phases of the first series marked (build and load, first step, epochs,
    evals). The torch allocator's figure on a GPU, host RSS on the CPU; from zero."""
    plt = pyplot()
    gpu = all(data.get("torch_allocated_bytes") for _, data in series)
    key, what = (
        ("torch_allocated_bytes", "torch allocated (MiB)") if gpu else ("host_rss_bytes", "host RSS (MiB)")
    )
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, data in series:
        mem = [m / MiB for m in data[key]]
        (line,) = ax.plot(data["t_s"], mem, label=label, linewidth=1.2)
        top = max(range(len(mem)), key=mem.__getitem__)
        ax.plot([data["t_s"][top]], [mem[top]], "o", color=line.get_color())
    first = series[0][1]
    for label, t in first["marks"]:
        ax.axvline(t, color="grey", linewidth=0.6, linestyle=":")
        ax.annotate(
            label,
            (t, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            va="top",
            ha="right",
            color="grey",
        )
    _axis(ax, f"time since the cell started (s; phases of {series[0][0]} marked)", what)
    return _save(plt, fig, [ax], f"{model}: memory over each cell's life (dots: peaks)", path)


# ---- the report's pictures: drawn into its folder, linked from its markdown ---------------------


def plot_name(cell: Cell, kind: str) -> str:
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cell.model)
    return f"{slug}-{hashlib.sha1(group_key(cell).encode()).hexdigest()[:6]}-{kind}.png"


def memory_picture(cell: Cell, variants: list[Variant], plot_dir, plot_link: str) -> list[str]:
    """The memory-breakdown picture of a model's variants (full first), linked; none when a part
    of the breakdown was not measured."""
    ok = sorted([v for v in variants if v.ok], key=lambda v: not v.cell.is_baseline)
    peak_key, _ = memory_key(ok)
    gpu = peak_key.startswith("torch")
    baseline_key = "torch_allocated_baseline_bytes" if gpu else "host_rss_baseline_bytes"
    rest = (
        (
            "data set (torch allocated at the start, less weights)",
            "temporaries, up to the peak torch allocated",
        )
        if gpu
        else (
            "data set, interpreter and libraries (host RSS at the start, less weights)",
            "temporaries, up to the peak host RSS",
        )
    )
    driver = next(
        (
            k
            for k in ("nvml_process_peak_bytes", "amdsmi_process_peak_bytes")
            if any(is_number(v.metrics.get(k)) for v in ok)
        ),
        None,
    )
    bars = []
    for v in ok:
        parts = breakdown(v.metrics, peak_key, baseline_key)
        if parts is None:
            return []
        parts["driver"] = v.metrics.get(driver) if driver else None
        bars.append((column_name(v), parts))
    name = plot_name(cell, "memory")
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    memory_breakdown_plot(cell.model, bars, Path(plot_dir) / name, rest, driver)
    return [
        f"![{cell.model}: where the memory goes, measured and predicted, per method]({plot_link}{name})",
        "",
    ]


def timeline_picture(
    cell: Cell, variants: list[Variant], plot_dir, plot_link: str, run_dirs: list[Path]
) -> list[str]:
    """Memory over time of the group's cells (rank 0's for a cell of several processes), from the
    timelines their run directories hold; none when there are none."""
    series = []
    for v in (v for v in variants if v.ok and v.first.info.get("timeline")):
        found = next(
            (
                Path(d) / v.first.info["timeline"]
                for d in run_dirs
                if (Path(d) / v.first.info["timeline"]).is_file()
            ),
            None,
        )
        if found is not None:
            series.append((column_name(v), json.loads(found.read_text(encoding="utf-8"))))
    if not series:
        return []
    name = plot_name(cell, "timeline")
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    timeline_plot(cell.model, series, Path(plot_dir) / name)
    return [f"![{cell.model}: memory over each cell's life, phases marked]({plot_link}{name})", ""]


def axis_plot(model: str, ok: list, field: str, label: str, path, memory: tuple[str, str]) -> list[tuple]:
    """Peak memory and the activations saved for backward against one axis of the matrix (sequence
    length, batch size), a line per method: where a method's advantage shrinks as activations grow."""
    plt = pyplot()
    mem_key, mem_label = memory
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    values = sorted({getattr(v.cell, field) for v in ok})
    for ax, (key, what) in zip(
        axes, [(mem_key, mem_label), ("activations_saved_bytes", "activations saved for backward (MiB)")]
    ):
        for name in dict.fromkeys(column_name(v) for v in sorted(ok, key=lambda v: not v.cell.is_baseline)):
            _line(
                ax,
                sorted(
                    (getattr(v.cell, field), v.metrics[key] / MiB)
                    for v in ok
                    if column_name(v) == name and is_number(v.metrics.get(key))
                ),
                name,
            )
        _axis(ax, label, what, values)
    return _save(plt, fig, axes, f"{model}: memory against {label}", path)


def axis_picture(model: str, variants: list, field: str, label: str, plot_dir, plot_link: str) -> list[str]:
    """The picture of `axis_plot`, drawn into the report's folder and linked."""
    name = plot_name(variants[0].cell, field)
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    axis_plot(model, variants, field, label, Path(plot_dir) / name, memory_key(variants))
    return [f"![{model}: peak memory against {label}, per method]({plot_link}{name})", ""]
