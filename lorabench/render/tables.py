"""Tables of a report: formats, repeats folded into variants, and one DataFrame per table.

    lorabench report results/<run-id>       # report.py lays these tables out on the page

Every figure is formatted here by its metric's kind (metrics.METRICS), and every table is a pandas
DataFrame rendered as GitHub-flavoured markdown. Delta columns follow the seed tables: the
reduction relative to full fine-tuning (positive: LoRA needs less).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from ..measure.stats import Summary
from ..plan.axes import AXES, NAMED_FIELDS, TABLE_FIELDS
from ..plan.cells import Cell
from ..results.metrics import BY_KEY, METRICS, framework_peak, is_number
from ..results.rows import Row, Status

MiB = 2**20


def _size(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:.0f} B"


FORMATS = {
    "count": lambda v: f"{int(round(v)):,}",
    "pct": lambda v: f"{v:.3g}%",
    "bytes": lambda v: f"{v / MiB:,.1f}",  # shown in MiB; the results keep bytes
    "time": lambda v: f"{v:.3f}" if v < 10 else f"{v:,.1f}",
    "ms": lambda v: f"{v * 1e3:.2f}",
    "rate": lambda v: f"{v:,.0f}",
    "acc": lambda v: f"{v:.4f}",
    "pt": lambda v: f"{v:+.1f} pt",
    "loss": lambda v: f"{v:.4f}",
    "sci": lambda v: f"{v:.1e}",
    "joules": lambda v: f"{v:,.1f}",
    "size": _size,
    "num": lambda v: f"{v:.4g}",
}


def fmt(value: Any, kind: str, why: str | None = None) -> str:
    """A figure as the report shows it; a missing one is blank, or `unavailable` when a reason is known."""
    if not is_number(value):
        return "unavailable" if why else ("" if value is None else str(value))
    return FORMATS[kind](value)


def delta(full: Any, other: Any, kind: str) -> str:
    """The seed tables' Delta: reduction relative to full fine-tuning."""
    if not (is_number(full) and is_number(other)):
        return ""
    if kind == "acc":
        return f"{(other - full) * 100:+.1f} pt"
    if kind == "loss":
        return f"{other - full:+.4f}"
    if kind == "pt":
        return f"{other - full:+.1f} pt"
    if kind in ("pct", "sci", "num") or full == 0:
        return ""
    if kind == "rate":
        change = abs(other - full) / full * 100
        return f"{change:.1f}% faster" if other >= full else f"{change:.1f}% slower"
    return f"{(full - other) / full * 100:.2f}%"


# ---- folding rows --------------------------------------------------------------------------


@dataclass
class Variant:
    """The repeats of one cell folded into one column: numbers become their median."""

    rows: list[Row]
    metrics: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    repeats: int = 0  # rows that finished ok
    epoch_summary: Summary | None = None

    @property
    def first(self) -> Row:
        return next((r for r in self.rows if r.ok), self.rows[0])

    @property
    def cell(self) -> Cell:
        return self.first.cell

    @property
    def label(self) -> str:
        return self.first.label

    @property
    def ok(self) -> bool:
        return self.repeats > 0

    @property
    def seeds(self) -> int:
        """Distinct seeds among the finished rows (a variant folds its seeds and their repeats)."""
        return len({r.cell.seed for r in self.rows if r.ok})

    @property
    def status(self) -> str:
        return Status.OK.value if self.ok else self.first.status.value

    @property
    def info(self) -> dict[str, str]:
        return self.first.info


def fold_repeats(rows: list[Row]) -> Variant:
    """Fold repeats of one cell: a figure every repeat measured -> their median; a figure one of
    them could not measure stays unavailable, with that repeat's reason (never another's value)."""
    v = Variant(rows)
    ok = [r for r in rows if r.ok]
    v.repeats = len(ok)
    for key in dict.fromkeys(k for r in ok for k in r.metrics):
        values = [r.metrics.get(key) for r in ok]
        if all(is_number(x) for x in values):
            v.metrics[key] = Summary.of(values).median
        else:
            v.metrics[key] = None
            why = next((r.unavailable[key] for r in ok if key in r.unavailable), None)
            if why:
                v.unavailable[key] = why
    spread = [r.metrics["epoch_s"] for r in ok if is_number(r.metrics.get("epoch_s"))]
    v.epoch_summary = Summary.of(spread) if spread else None
    return v


def group_key(cell: Cell) -> str:
    d = cell.to_dict()
    return json.dumps({k: v for k, v in d.items() if k not in TABLE_FIELDS}, sort_keys=True)


def _order(v: Variant) -> tuple:
    c = v.cell
    return (not c.is_baseline, c.method, c.rank or 0, str(c.alpha), str(c.targets), c.nproc, c.strategy or "")


def groups(rows: list[Row]) -> list[tuple[Cell, list[Variant]]]:
    """[(a cell of the group, [folded variant, ...])], one group per comparison table."""
    by_variant = _by_variant(rows)
    by_group: dict[str, list[Variant]] = defaultdict(list)
    for variant_rows in by_variant.values():
        folded = fold_repeats(variant_rows)
        by_group[group_key(folded.cell)].append(folded)
    out = []
    for variants in by_group.values():
        variants.sort(key=_order)
        out.append((variants[0].cell, variants))
    out.sort(
        key=lambda g: (g[0].model, g[0].seq_len, g[0].batch_size, group_key(g[0]))
    )  # sizes in numeric order
    return out


# ---- tables --------------------------------------------------------------------------------


def markdown(df: pd.DataFrame, numeric_cols: Iterable[str] = ()) -> str:
    numeric = set(numeric_cols)
    align = ["right" if c in numeric else "left" for c in df.columns]
    return df.to_markdown(index=False, colalign=align, disable_numparse=True)  # cells are formatted already


def column_name(v: Variant) -> str:
    name, c = v.label, v.cell
    if c.rank is not None and c.alpha is not None and c.alpha != c.rank:
        name += f" a={c.alpha:g}"
    if c.pretrain_epochs:
        name += f" after {c.pretrain_epochs} full epochs"
    if v.repeats > max(v.seeds, 1):  # repeats of a seed measure the machine: say how many
        name += f" (x{v.repeats // max(v.seeds, 1)})"
    return name


def comparison_table(variants: list[Variant]) -> str:
    """Rows: the shown figures of METRICS that any column measured; columns: full, then each
    LoRA variant with its Delta vs full."""
    ok = [v for v in variants if v.ok]
    full = next((v for v in ok if v.cell.is_baseline), None)
    present = [m for m in METRICS if m.shown and any(is_number(v.metrics.get(m.key)) for v in ok)]
    columns: dict[str, list[str]] = {"Comparison": [m.label for m in present]}
    numeric_cols = []
    for v in ([full] if full else []) + [v for v in ok if v is not full]:  # seed layout: full first
        name = column_name(v)
        columns[name] = [fmt(v.metrics.get(m.key), m.fmt, v.unavailable.get(m.key)) for m in present]
        numeric_cols.append(name)
        if v is not full and full is not None:
            dname = f"Delta {name}"
            columns[dname] = [delta(full.metrics.get(m.key), v.metrics.get(m.key), m.fmt) for m in present]
            numeric_cols.append(dname)
    return markdown(pd.DataFrame(columns), numeric_cols)


def _ratio(value: Any) -> str:
    """A ratio to three significant digits: 1.00, 0.987, 12.3."""
    return f"{value:#.3g}" if is_number(value) else ""


def answers_table(variants: list[Variant]) -> str:
    """The terminal's table: per variant, the answers (trainable share, peak memory, epoch time,
    quality, each with its saving against full fine-tuning) and how far the memory prediction was
    from the measurement. Memory is the framework level: the allocator's on a GPU, the live
    tensors' on the CPU."""
    ok = [v for v in variants if v.ok]
    full = next((v for v in ok if v.cell.is_baseline), None)
    order = ([full] if full else []) + [v for v in ok if v is not full]
    peak = {id(v): framework_peak(v.metrics) for v in order}
    cols: dict[str, list[str]] = {
        "method": [column_name(v) for v in order],
        "trainable": [fmt(v.metrics.get("params_trainable_pct"), "pct") for v in order],
        "peak MiB": [fmt(peak[id(v)], "bytes") for v in order],
        "saved": [
            delta(peak[id(full)], peak[id(v)], "bytes") if full and v is not full else "" for v in order
        ],
        "epoch s": [fmt(v.metrics.get("epoch_s"), "time") for v in order],
        "saved ": [
            delta(full.metrics.get("epoch_s"), v.metrics.get("epoch_s"), "time")
            if full and v is not full
            else ""
            for v in order
        ],
        "accuracy": [fmt(v.metrics.get("final_eval_accuracy"), "acc") for v in order],
        "predicted/measured": [_ratio(v.metrics.get("predicted_over_measured")) for v in order],
    }
    numeric = [c for c in cols if c != "method"]
    return markdown(pd.DataFrame(cols), numeric)


# (row, predicted figure, measured figure); the measured total sums every row but the saved
# activations, which the peak-based activations + temporaries already contain
PREDICTION_ROWS = [
    ("weights", "predicted_weights_bytes", "weights_bytes"),
    ("gradients", "predicted_grads_bytes", "grads_bytes"),
    ("optimizer state", "predicted_optimizer_bytes", "optimizer_state_bytes"),
    ("activations saved for backward", "predicted_activations_bytes", "activations_saved_bytes"),
    ("activations + temporaries at the peak", None, "activations_bytes"),
]


def prediction_table(variants: list[Variant]) -> str:
    """Predicted (closed form, before the run) vs measured memory, MiB, per variant."""
    ok = [v for v in variants if v.ok and is_number(v.metrics.get("predicted_total_bytes"))]
    if not ok:
        return ""
    cols: dict[str, list[str]] = {"memory (MiB)": [label for label, _, _ in PREDICTION_ROWS] + ["total"]}
    for v in ok:
        m, name = v.metrics, column_name(v)
        pred = [m.get(p) if p else None for _, p, _ in PREDICTION_ROWS]
        meas = [m.get(k) for _, _, k in PREDICTION_ROWS]
        cols[f"{name} predicted"] = [fmt(x, "bytes") for x in pred] + [
            fmt(m["predicted_total_bytes"], "bytes")
        ]
        peak_parts = [m.get(k) for _, _, k in PREDICTION_ROWS if k != "activations_saved_bytes"]
        total = sum(peak_parts) if all(is_number(x) for x in peak_parts) else None
        cols[f"{name} measured"] = [fmt(x, "bytes") for x in meas] + [fmt(total, "bytes")]
        if is_number(m.get("predicted_peak_bytes")):  # the simulated step's peak, at the framework level
            cols[f"{name} predicted"].append(fmt(m["predicted_peak_bytes"], "bytes"))
            cols[f"{name} measured"].append(fmt(framework_peak(m), "bytes"))
    if any(is_number(v.metrics.get("predicted_peak_bytes")) for v in ok):
        cols["memory (MiB)"].append(
            "peak (simulated step; measured: allocator on a GPU, live tensors on the CPU)"
        )
        for c in cols.values():  # a variant from before the simulated step has no such row
            c.extend([""] * (len(cols["memory (MiB)"]) - len(c)))
    return markdown(pd.DataFrame(cols), [c for c in cols if c != "memory (MiB)"])


def epochs_table(variants: list[Variant]) -> str:
    """Loss and accuracy per epoch for each variant (first repeat), as seed 003's table."""
    frames, timed = [], {}
    for v in variants:
        if not v.ok:
            continue
        recs = v.first.epochs
        timed.update((e["epoch"], e["timed"]) for e in recs)
        name = column_name(v)
        frames.append(
            pd.DataFrame(
                {
                    "epoch": [e["epoch"] for e in recs],
                    f"{name} loss": [f"{e['eval_loss']:.4f}" for e in recs],
                    f"{name} acc": [f"{e['eval_accuracy']:.4f}" for e in recs],
                }
            ).set_index("epoch")
        )
    if not frames:
        return ""
    df = pd.concat(frames, axis=1).reset_index()
    df["epoch"] = [f"{e}" if timed.get(e, True) else f"{e} (warm-up)" for e in df["epoch"]]
    return markdown(df.fillna(""), [c for c in df.columns if c != "epoch"])


def memory_key(variants: list[Variant]) -> tuple[str, str]:
    """The peak memory figure the sweep plots: the allocator's on a GPU, host RSS on the CPU."""
    if any(is_number(v.metrics.get("torch_peak_allocated_bytes")) for v in variants):
        return "torch_peak_allocated_bytes", "peak torch allocated (MiB)"
    return "host_peak_rss_bytes", "peak host RSS (MiB)"


def rank_sweep_table(variants: list[Variant]) -> str:
    """One row per rank (full first), per LoRA method: trainable parameters, memory, time, quality."""
    ok = [v for v in variants if v.ok]
    mem_key, mem_label = memory_key(ok)
    figure = lambda key: [fmt(v.metrics.get(key), BY_KEY[key].fmt) for v in ok]
    df = pd.DataFrame(
        {
            "method": [v.cell.method for v in ok],
            "rank": [str(v.cell.rank) if v.cell.rank else "-" for v in ok],
            "trainable": figure("params_trainable"),
            mem_label: figure(mem_key),
            "weights + grads + optimizer (MiB)": figure("state_bytes"),
            "epoch time (s)": figure("epoch_s"),
            "final accuracy": figure("final_eval_accuracy"),
        }
    )
    return markdown(df, [c for c in df.columns if c not in ("method", "rank")])


def _one_process(ok: list[Variant], v: Variant) -> Variant | None:
    """The variant that is `v` run in one process (its scaling reference)."""
    return next(
        (
            o
            for o in ok
            if o.cell.nproc == 1
            and o.cell.method == v.cell.method
            and o.cell.rank == v.cell.rank
            and o.cell.alpha == v.cell.alpha
            and o.cell.targets == v.cell.targets
        ),
        None,
    )


def scaling_efficiency(ok: list[Variant], v: Variant) -> float | None:
    """throughput(N) / (N x throughput(1)): 1 is perfect scaling; None without a one-process reference."""
    one = _one_process(ok, v)
    a, b = v.metrics.get("samples_per_s"), one.metrics.get("samples_per_s") if one else None
    return a / (v.cell.nproc * b) if is_number(a) and is_number(b) and b > 0 else None


def scaling_table(variants: list[Variant]) -> str:
    """One row per method and process count: what must fit on one device (max over ranks), what
    all devices hold (sum), global throughput and scaling efficiency against the same method in
    one process."""
    ok = sorted(
        [v for v in variants if v.ok], key=lambda v: (_order(v)[:-2], v.cell.strategy or "", v.cell.nproc)
    )
    mem_key, mem_label = memory_key(ok)
    summed = {
        "torch_peak_allocated_bytes": "torch_peak_allocated_sum_bytes",
        "host_peak_rss_bytes": "host_peak_rss_sum_bytes",
    }[mem_key]
    df = pd.DataFrame(
        {
            "method": [v.cell.method_label for v in ok],
            "strategy": [v.cell.strategy or "-" for v in ok],
            "processes": [str(v.cell.nproc) for v in ok],
            f"per device: max, {mem_label}": [fmt(v.metrics.get(mem_key), "bytes") for v in ok],
            "all devices: sum (MiB)": [
                fmt(v.metrics.get(summed if v.cell.nproc > 1 else mem_key), "bytes") for v in ok
            ],
            "weights + grads + optimizer per device (MiB)": [
                fmt(v.metrics.get("state_bytes"), "bytes") for v in ok
            ],
            "throughput (samples/s)": [fmt(v.metrics.get("samples_per_s"), "rate") for v in ok],
            "scaling efficiency": [
                fmt(scaling_efficiency(ok, v) * 100, "pct")
                if v.cell.nproc > 1 and scaling_efficiency(ok, v) is not None
                else ""
                for v in ok
            ],
        }
    )
    return markdown(df, [c for c in df.columns if c not in ("method", "strategy")])


def varying(cells: list[Cell]) -> list[str]:
    """The named fields (axes.AXES with a title) whose values differ across `cells`."""
    return [f for f in NAMED_FIELDS if len({json.dumps(getattr(c, f), default=str) for c in cells}) > 1]


def long_table(rows: list[Row]) -> str:
    """One line per cell (repeats folded): model, method and every field that varies, beside the
    figures a choice turns on. For a matrix of more than two axes, where per-group tables scatter."""
    fields = [f for f in varying([r.cell for r in rows]) if f != "rank"]
    ok = [fold_repeats(rs) for rs in _by_variant(rows).values()]
    ok = sorted(
        (v for v in ok if v.ok),
        key=lambda v: (v.cell.model, *_order(v)[:3], *(str(getattr(v.cell, f)) for f in fields)),
    )
    mem_key, mem_label = memory_key(ok)
    figure = lambda key: [fmt(v.metrics.get(key), BY_KEY[key].fmt, v.unavailable.get(key)) for v in ok]
    df = pd.DataFrame(
        {
            "model": [v.cell.model for v in ok],
            "method": [v.cell.method_label for v in ok],
            **{AXES[f].title: [str(getattr(v.cell, f)) for v in ok] for f in fields},
            "trainable": figure("params_trainable"),
            mem_label: figure(mem_key),
            "saved activations (MiB)": figure("activations_saved_bytes"),
            "step time p50 (ms)": figure("step_s_p50"),
            "throughput (samples/s)": figure("samples_per_s"),
            "final accuracy": figure("final_eval_accuracy"),
        }
    )
    return markdown(
        df, [c for c in df.columns if c not in ("model", "method", *(AXES[f].title for f in fields))]
    )


def _by_variant(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        out[r.cell.variant_key(across_seeds=True)].append(r)
    return out
