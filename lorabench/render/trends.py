"""A history as markdown and pictures: each gated figure of each cell over the nights, with the
window's band and the flagged nights marked; and tonight's gate against the window.

    lorabench history report history/cuda -o history/cuda/index.md
    lorabench compare --history history/cuda nightly/<run-id>
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from ..results.compare import GATED, change_of
from ..results.history import Series
from ..results.metrics import BY_KEY
from .tables import fmt, markdown

LATEST = 7  # nights in the page's table

# figure unit -> (scale, axis unit): what the pictures plot
SCALES = {"bytes": (2**-20, "MiB"), "s": (1e3, "ms"), "fraction": (100, "%")}


def _change(s: Series) -> str:
    p, kind = s.points[-1], GATED[s.figure][0]
    if p.median is None or (not p.median and kind != "quality"):
        return ""
    change = change_of(kind, p.median, p.value)
    return f"{change:+.2f} pt" if kind == "quality" else f"{change:+.1f}%"


def _band(s: Series) -> str:
    p = s.points[-1]
    if p.band is None:
        return "(first night of its series)"
    if GATED[s.figure][0] == "quality":
        return f"±{p.band * 100:.2f} pt"
    return f"±{p.band / p.median * 100:.1f}%" if p.median else ""


def window_report(series: list[Series], run: str, k: int) -> str:
    """Tonight's figures against the median of their window, flagged ones first named with the
    range of commits to bisect."""
    flagged = [s for s in series if s.points[-1].flagged]
    out = [
        f"# lorabench compare: {run} against its history (median of the last {k} comparable nights)",
        "",
        f"{len(flagged)} regression(s) flagged among {len(series)} figures compared."
        if flagged
        else f"No regression among {len(series)} figures compared.",
        "",
    ]
    for s in flagged:
        p = s.points[-1]
        out.append(
            f"- **{s.model} {s.label}: {s.figure}** {_change(s)} against the window: last good "
            f"{p.last_good.name if p.last_good else 'none'}, first bad {p.night.name}."
        )
    if flagged:
        out.append("")
    if series:
        df = pd.DataFrame(
            {
                "model": [s.model for s in series],
                "cell": [s.label for s in series],
                "figure": [s.figure for s in series],
                "tonight": [fmt(s.points[-1].value, BY_KEY[s.figure].fmt) for s in series],
                "window median": [
                    fmt(s.points[-1].median, BY_KEY[s.figure].fmt) if s.points[-1].median is not None else ""
                    for s in series
                ],
                "nights": [len(s.points) - 1 for s in series],
                "change": [_change(s) for s in series],
                "band": [_band(s) for s in series],
                "verdict": ["REGRESSION" if s.points[-1].flagged else "ok" for s in series],
            }
        )
        out += [markdown(df, ["tonight", "window median", "nights", "change", "band"]), ""]
    return "\n".join(out)


def _picture(cell_series: list[Series], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(cell_series), 1, figsize=(8, 2.2 * len(cell_series)), squeeze=False, sharex=True
    )
    for ax, s in zip(axes[:, 0], cell_series):
        scale, unit = SCALES.get(BY_KEY[s.figure].unit, (1.0, BY_KEY[s.figure].unit))
        x = list(range(len(s.points)))
        ax.plot(x, [p.value * scale for p in s.points], marker=".", lw=1, color="#4c72b0", label="night")
        banded = [(i, p) for i, p in enumerate(s.points) if p.median is not None]
        if banded:
            ax.fill_between(
                [i for i, _ in banded],
                [(p.median - p.band) * scale for _, p in banded],
                [(p.median + p.band) * scale for _, p in banded],
                color="#4c72b0",
                alpha=0.15,
                label="window median ± band",
            )
        bad = [(i, p) for i, p in enumerate(s.points) if p.flagged]
        if bad:
            ax.scatter(
                [i for i, _ in bad],
                [p.value * scale for _, p in bad],
                color="#c44e52",
                marker="x",
                s=60,
                zorder=3,
                label="flagged",
            )
        ax.set_ylabel(f"{s.figure}\n({unit})", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(
        f"{cell_series[0].model} {cell_series[0].label} on {cell_series[0].accelerator}", fontsize=9
    )
    axes[0, 0].legend(fontsize=7, loc="lower left")
    last = cell_series[0].points
    ticks = sorted({0, len(last) - 1, *range(0, len(last), max(1, len(last) // 6))})
    axes[-1, 0].set_xticks(ticks, [last[i].night.date[:10] for i in ticks], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def history_page(series: list[Series], plot_dir: Path | None, plot_link: str = "") -> str:
    """The trend page: flagged nights with the commits to bisect, a table of the latest nights,
    and a picture per cell of every gated figure over time (where `plot_dir` is given)."""
    nights = sorted(
        {p.night.run_id: p.night for s in series for p in s.points}.values(), key=lambda n: n.date
    )
    out = [f"# lorabench history: {len(nights)} nights", ""]
    flags = [(s, p) for s in series for p in s.flagged]
    out += [f"{len(flags)} flagged night(s) of a figure.", ""]
    for s, p in sorted(flags, key=lambda sp: sp[1].night.date):
        out.append(
            f"- {s.accelerator}, **{s.model} {s.label}: {s.figure}**: first bad {p.night.name}; last good "
            f"{p.last_good.name if p.last_good else 'none'}"
        )
    if flags:
        out.append("")
    latest = nights[-LATEST:]
    if latest:
        by_night = {
            n.run_id: [f"{s.model} {s.label}: {s.figure}" for s, p in flags if p.night.run_id == n.run_id]
            for n in latest
        }
        df = pd.DataFrame(
            {
                "night": [n.run_id for n in latest],
                "date": [n.date for n in latest],
                "commit": [(n.commit or "unknown")[:12] for n in latest],
                "accelerator": [n.accelerator for n in latest],
                "cells": [len(n.cells) for n in latest],
                "flagged": ["; ".join(by_night[n.run_id]) or "none" for n in latest],
            }
        )
        out += [f"## The latest {len(latest)} nights", "", markdown(df, ["cells"]), ""]
    if plot_dir is not None:
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        cells: dict[tuple[str, str], list[Series]] = {}
        for s in series:
            cells.setdefault((s.accelerator, s.key), []).append(s)
        for (accelerator, key), group in cells.items():
            name = (
                f"{group[0].model}-{hashlib.sha256((accelerator + key).encode()).hexdigest()[:6]}-trend.png"
            )
            _picture(group, Path(plot_dir) / name)
            out += [
                f"## {group[0].model} {group[0].label} on {accelerator}",
                "",
                f"![{group[0].model} {group[0].label}: every gated figure over the nights]({plot_link}{name})",
                "",
            ]
    return "\n".join(out)
