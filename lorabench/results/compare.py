"""Compare two runs cell by cell and flag regressions a CI job can gate on.

    lorabench compare results/<base-run> results/<new-run> --fail-on-regression

Cells are matched by all their parameters except the repeat index; repeats fold into their
median. A change is a regression when it is worse than its figure's threshold (time 10 %,
memory 5 %, accuracy 1 point by default) and, where either run has repeats, also beyond twice
the combined measured spread, so noise alone does not fail a build. Counts and tensor sizes that
are exact by construction (parameters, weights, gradients, optimizer state, saved activations,
checkpoints) are called out when they change at all. Which figure is gated, in which direction,
and which is exact is declared once, in `metrics.METRICS`.

Two runs on different hardware or software are not a regression test: a change of the device
model, the GPU driver or the torch version is refused (exit 2) unless
`--allow-environment-change` is given, and the comparison then says so first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ..errors import InputError
from ..measure.stats import Summary
from .metrics import METRICS, is_number
from .rows import Row

# figure -> (kind, +1 when higher is worse / -1 when lower is worse)
GATED: dict[str, tuple[str, int]] = {m.key: (m.gate, m.worse) for m in METRICS if m.gate}
EXACT = tuple(m.key for m in METRICS if m.exact)
# kind -> (default limit, its unit, what a regression is)
THRESHOLDS = {
    "time": (10.0, "%", "slower"),
    "memory": (5.0, "%", "larger"),
    "quality": (1.0, "points", "accuracy lower"),
}
DEFAULT_THRESHOLDS = {kind: default for kind, (default, _, _) in THRESHOLDS.items()}
# environment key -> what it is: a change of any of them makes every figure incomparable
ENVIRONMENT = {
    "device": "device",
    "gpu_name": "GPU model",
    "cpu": "CPU model",
    "gpu_driver": "GPU driver",
    "torch": "torch version",
}


class EnvironmentChanged(InputError):
    """The runs were made on different hardware or software."""


@dataclass(frozen=True)
class Change:
    model: str
    label: str
    figure: str
    kind: str  # time | memory | quality | exact
    base: float
    new: float
    change: float  # % of base for time and memory; points for quality; absolute for exact
    threshold: float  # what the change had to exceed to count (spread included)
    regression: bool


@dataclass
class Comparison:
    changes: list[Change] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_new: list[str] = field(default_factory=list)
    environment_changes: list[str] = field(default_factory=list)  # allowed by the caller, said first

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]


def by_variant(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.ok:
            out[r.cell.variant_key()].append(r)
    return out


def repeat_values(rows: list[Row], figure: str) -> list[float]:
    """Every repeat's value, or none when a repeat could not measure it: a median of the others
    would stand in for a figure that is missing."""
    values = [r.metrics.get(figure) for r in rows]
    return values if all(is_number(v) for v in values) else []


def change_of(kind: str, base: float, new: float) -> float:
    """How far `new` is from `base`: points for quality (accuracy), % of base for time and memory
    (0 where base is 0)."""
    if kind == "quality":
        return (new - base) * 100
    return (new - base) / base * 100 if base else 0.0


def environment_changes(base_rows: list[Row], new_rows: list[Row]) -> list[str]:
    """'GPU model: A -> B' for each ENVIRONMENT fact that differs between the runs."""

    def seen(rows, key):
        return ", ".join(sorted({str(r.environment[key]) for r in rows if key in r.environment}))

    out = []
    for key, what in ENVIRONMENT.items():
        b, n = seen(base_rows, key), seen(new_rows, key)
        if b != n:
            out.append(f"{what}: {b or 'unknown'} -> {n or 'unknown'}")
    return out


def compare(
    base_rows: list[Row],
    new_rows: list[Row],
    thresholds: dict[str, float] | None = None,
    allow_environment_change: bool = False,
) -> Comparison:
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    for kind, value in th.items():
        if not value >= 0:
            raise InputError(f"--{kind}-threshold must be >= 0, got {value:g}")
    changed = environment_changes(base_rows, new_rows)
    if changed and not allow_environment_change:
        raise EnvironmentChanged(
            f"the runs differ in {'; '.join(changed)}: a change of hardware or software is not a "
            "regression (--allow-environment-change compares them anyway)"
        )
    base, new = by_variant(base_rows), by_variant(new_rows)
    result = Comparison(environment_changes=changed)
    describe = lambda rows: f"{rows[0].cell.model} {rows[0].label}"
    result.only_in_base = sorted(describe(base[k]) for k in base.keys() - new.keys())
    result.only_in_new = sorted(describe(new[k]) for k in new.keys() - base.keys())
    for key in [k for k in base if k in new]:
        b_rows, n_rows = base[key], new[key]
        model, label = b_rows[0].cell.model, b_rows[0].label
        for figure, (kind, worse) in GATED.items():
            bv, nv = repeat_values(b_rows, figure), repeat_values(n_rows, figure)
            if not bv or not nv:
                continue
            b, n = Summary.of(bv), Summary.of(nv)
            change = change_of(kind, b.median, n.median)
            if kind == "quality":
                noise = 2 * math.hypot(b.stdev, n.stdev) * 100  # points
            else:
                noise = 2 * math.hypot(b.stdev_pct, n.stdev_pct)
            limit = max(th[kind], noise)
            result.changes.append(
                Change(model, label, figure, kind, b.median, n.median, change, limit, change * worse > limit)
            )
        for figure in EXACT:
            bv, nv = repeat_values(b_rows, figure), repeat_values(n_rows, figure)
            if bv and nv and bv[0] != nv[0]:
                result.changes.append(
                    Change(model, label, figure, "exact", bv[0], nv[0], nv[0] - bv[0], 0.0, True)
                )
    return result
