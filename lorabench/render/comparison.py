"""`lorabench compare` as markdown: the change of every figure of every matched cell, regressions flagged.

    lorabench compare results/base results/new -o compare.md

The changes and their gates are computed in `compare`; this module only writes them down.
"""

from __future__ import annotations

import pandas as pd

from .tables import markdown


def comparison_report(cmp, base_name: str, new_name: str) -> str:
    """The change of every figure of every matched cell, regressions flagged."""
    out = [f"# lorabench compare: {base_name} -> {new_name}", ""]
    if cmp.environment_changes:
        out += [
            "**The environment changed** (compared anyway, --allow-environment-change): "
            + "; ".join(cmp.environment_changes)
            + ". Differences below may be the machine's, not the code's.",
            "",
        ]
    regs = cmp.regressions
    out.append(
        f"{len(regs)} regression(s) flagged among {len(cmp.changes)} figures compared."
        if regs
        else f"No regression among {len(cmp.changes)} figures compared."
    )
    out.append("")
    if cmp.changes:

        def change(c):
            if c.kind == "quality":
                return f"{c.change:+.2f} pt"
            if c.kind == "exact":
                return f"{c.change:+,.0f} (must not change)"
            return f"{c.change:+.1f}%"

        df = pd.DataFrame(
            {
                "model": [c.model for c in cmp.changes],
                "cell": [c.label for c in cmp.changes],
                "figure": [c.figure for c in cmp.changes],
                "base": [_fmt_any(c.base) for c in cmp.changes],
                "new": [_fmt_any(c.new) for c in cmp.changes],
                "change": [change(c) for c in cmp.changes],
                "limit": [
                    ""
                    if c.kind == "exact"
                    else (f"{c.threshold:.1f} pt" if c.kind == "quality" else f"{c.threshold:.1f}%")
                    for c in cmp.changes
                ],
                "verdict": ["REGRESSION" if c.regression else "ok" for c in cmp.changes],
            }
        )
        out += [markdown(df, ["base", "new", "change", "limit"]), ""]
    for title, cells in (
        ("Only in the base run", cmp.only_in_base),
        ("Only in the new run", cmp.only_in_new),
    ):
        if cells:
            out += [f"{title}: " + ", ".join(cells), ""]
    return "\n".join(out)


def _fmt_any(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v:,.0f}"
    return f"{v:.4g}"
