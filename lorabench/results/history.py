"""The nightly's memory: every run kept with its commit, date and environment, and a gate against a
window of past nights instead of last night alone.

    lorabench history add nightly/<run-id> --to history/cuda
    lorabench compare --history history/cuda nightly/<run-id> --fail-on-regression
    lorabench history report history/cuda -o history/cuda/index.md

A history is a folder holding `history.jsonl`: a header line naming the format, then one line per
run (a night) with its gated figures per cell, repeats folded into their median. Any folder works:
the nightly keeps it on a git branch, so it outlives artifact retention.

The gate: each figure of each cell forms a series over the nights with the same environment (a new
device, driver or torch starts a new series). A night is judged against the median of the last K
nights of its series (K=7, at least 3), with a band of the wider of the figure's threshold
(`compare`'s) and a 99.5 % prediction interval from the spread of every night of the series
(`band_of`). A
night outside the band, the bad way, is flagged, and the series restarts at it: a step is flagged
on its first night only, and the nights after it are judged against the new level. The last good
and first bad nights around a flag name the range of commits to bisect.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .compare import DEFAULT_THRESHOLDS, ENVIRONMENT, GATED, by_variant, change_of, repeat_values
from .metrics import BY_KEY
from .rows import Row
from .rundir import RunDir, RunDirError

FORMAT = 1  # of history.jsonl; a reader refuses any other
FILE = "history.jsonl"
WINDOW = 7  # nights a night is judged against
MIN_WINDOW = 3  # fewer nights than this give no spread to judge by: such a night is kept, not judged
MAD_SIGMA = 1.4826  # a normal distribution's standard deviation per median absolute deviation
# Student's t, one-sided 99.5 %, by degrees of freedom (index 0: undefined): a window of a few nights
# knows its spread poorly, so its band is wider than three of its standard deviations.
T995 = (
    math.inf,
    63.657,
    9.925,
    5.841,
    4.604,
    4.032,
    3.707,
    3.499,
    3.355,
    3.250,
    3.169,
    3.106,
    3.055,
    3.012,
    2.977,
    2.947,
    2.921,
    2.898,
    2.878,
    2.861,
    2.845,
    2.831,
    2.819,
    2.807,
    2.797,
    2.787,
    2.779,
    2.771,
    2.763,
    2.756,
    2.750,
)


class HistoryError(InputError):
    """A history that cannot be read or appended to as asked."""


@dataclass(frozen=True)
class Night:
    """One run as the history keeps it: {cell key: {"model", "label", "figures": {figure: median}}}."""

    run_id: str
    date: str  # ISO 8601, from the run id (UTC)
    commit: str | None
    accelerator: str
    environment: dict[str, str]
    cells: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def name(self) -> str:
        """How a report names the night: its run id, date and commit."""
        return f"{self.run_id} ({self.date}, commit {(self.commit or 'unknown')[:12]})"


def night_of(run_dir: Path, rows: list[Row]) -> Night:
    """The history's record of a run directory, from its final rows (`RunDir.load`: a retried cell's
    last row only), read once by the caller."""
    run = RunDir(Path(run_dir))
    ok = [r for r in rows if r.ok]
    if not ok:
        raise HistoryError(f"{run_dir}: no cell finished ok; a night without figures is not kept")
    try:
        commit = run.plan().get("lorabench_commit")
    except RunDirError:  # a run without its plan (merged, copied) still has figures
        commit = None
    env = next((r.environment for r in ok if r.environment), {})
    cells = {}
    for key, rs in by_variant(ok).items():
        figures = {}
        for figure in GATED:
            values = repeat_values(rs, figure)
            if values:
                figures[figure] = statistics.median(values)
        cells[key] = {"model": rs[0].cell.model, "label": rs[0].label, "figures": figures}
    rid = run.run_id
    date = (
        f"{rid[0:4]}-{rid[4:6]}-{rid[6:8]}T{rid[9:11]}:{rid[11:13]}:{rid[13:15]}Z"
        if rid[:8].isdigit()
        else ""
    )
    return Night(
        run_id=rid,
        date=date,
        commit=commit,
        accelerator=str(env.get("gpu_name") or env.get("cpu") or env.get("device") or "unknown"),
        environment={k: str(env[k]) for k in ENVIRONMENT if k in env},
        cells=cells,
    )


def load(history: Path) -> list[Night]:
    """Every night of a history, oldest first (an absent history is an empty one)."""
    path = Path(history) / FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, ValueError):
        raise HistoryError(f"{path}: not a lorabench history (no header line)") from None
    if header.get("lorabench_history") != FORMAT:
        raise HistoryError(
            f"{path}: history format {header.get('lorabench_history')!r}, this lorabench reads {FORMAT}"
        )
    nights = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            nights.append(Night(**json.loads(line)))
        except (ValueError, TypeError) as e:
            raise HistoryError(f"{path}, line {n}: not a night of this format ({e})") from None
    return sorted(nights, key=lambda x: (x.date, x.run_id))


def add(night: Night, history: Path) -> Night:
    """Append the night to the history (created when absent); a run already there is refused."""
    have = load(history)
    if any(n.run_id == night.run_id for n in have):
        raise HistoryError(f"run {night.run_id} is already in {history}: a night is added once")
    path = Path(history) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        if not have and f.tell() == 0:
            f.write(json.dumps({"lorabench_history": FORMAT}) + "\n")
        f.write(json.dumps(night.to_json(), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return night


@dataclass(frozen=True)
class Point:
    """One night of one figure's series, judged against the window before it."""

    night: Night
    value: float
    median: float | None  # of the window (None: fewer than MIN_WINDOW earlier nights in the series)
    band: float | None  # half-width of the band around it, in the figure's units
    flagged: bool
    last_good: Night | None = None  # where flagged: the night before it in the series


def band_of(window: list[float], spread_of: list[float], kind: str, limit: float) -> tuple[float, float]:
    """(median of `window`, half-width of the band): the wider of the threshold (`limit`: % of the
    median for time and memory, points for quality) and a 99.5 % one-sided prediction interval for
    one more night, from the nights `spread_of` (every night of the series since it last restarted:
    more nights than the window, so a spread that is better known): Student's t for their number,
    times sqrt(1 + 1/n), times the larger of their standard deviation and 1.4826 x their median
    absolute deviation."""
    median = statistics.median(window)
    n, centre = len(spread_of), statistics.median(spread_of)
    mad = statistics.median(abs(v - centre) for v in spread_of)
    spread = max(statistics.stdev(spread_of) if n > 1 else 0.0, MAD_SIGMA * mad)
    t = T995[n - 1] if n - 1 < len(T995) else 2.576
    floor = limit / 100 if kind == "quality" else abs(median) * limit / 100
    return median, max(floor, t * spread * math.sqrt(1 + 1 / n))


def judge(
    series: list[tuple[Night, float]], figure: str, k: int = WINDOW, limit: float | None = None
) -> list[Point]:
    """Every night of a series judged against the (up to) k nights before it since the last flag."""
    kind, worse = GATED[figure]
    limit = DEFAULT_THRESHOLDS[kind] if limit is None else limit
    out: list[Point] = []
    start = 0  # the series restarts at a flagged night
    for i, (night, value) in enumerate(series):
        window = [v for _, v in series[max(start, i - k) : i]]
        if len(window) < min(MIN_WINDOW, k):
            out.append(Point(night, value, None, None, False))
            continue
        median, band = band_of(window, [v for _, v in series[start:i]], kind, limit)
        flagged = (value - median) * worse > band
        out.append(Point(night, value, median, band, flagged, series[i - 1][0] if flagged else None))
        if flagged:
            start = i
    return out


def last_night_only(series: list[tuple[Night, float]], figure: str, limit: float | None = None) -> list[bool]:
    """The gate the nightly had before: each night against the one before it, the threshold alone."""
    kind, worse = GATED[figure]
    limit = DEFAULT_THRESHOLDS[kind] if limit is None else limit
    out = [False]
    for (_, before), (_, value) in zip(series, series[1:]):
        out.append(change_of(kind, before, value) * worse > limit)
    return out


@dataclass
class Series:
    """A figure of a cell over the nights of one environment, judged."""

    key: str
    model: str
    label: str
    figure: str
    accelerator: str
    points: list[Point] = field(default_factory=list)

    @property
    def flagged(self) -> list[Point]:
        return [p for p in self.points if p.flagged]


def series_of(nights: list[Night], k: int = WINDOW, limits: dict[str, float] | None = None) -> list[Series]:
    """Every cell's gated figures as judged series; each environment a series of its own (only the
    newest environment's series of a figure is kept: older ones no longer gate anything)."""
    limits = {**DEFAULT_THRESHOLDS, **(limits or {})}
    raw: dict[tuple[str, str], list[tuple[Night, float]]] = {}
    labels: dict[str, tuple[str, str]] = {}
    for night in nights:
        for key, cell in night.cells.items():
            labels[key] = (cell["model"], cell["label"])
            for figure, value in cell["figures"].items():
                if figure in GATED:
                    raw.setdefault((key, figure), []).append((night, value))
    out = []
    for (key, figure), points in raw.items():
        newest_env = points[-1][0].environment
        # a run of nights in the newest environment, uninterrupted by another environment's
        cut = max((i + 1 for i, (n, _) in enumerate(points) if n.environment != newest_env), default=0)
        same = points[cut:]
        model, label = labels[key]
        kind = GATED[figure][0]
        out.append(
            Series(key, model, label, figure, same[-1][0].accelerator, judge(same, figure, k, limits[kind]))
        )
    return sorted(out, key=lambda s: (s.accelerator, s.model, s.label, list(GATED).index(s.figure)))


def tonight(
    history: Path, night: Night, k: int = WINDOW, limits: dict[str, float] | None = None
) -> list[Series]:
    """The series of the history with the night judged as their newest (it need not be in the
    history yet; where it is, it is judged where it stands)."""
    nights = load(history)
    at = next((i for i, n in enumerate(nights) if n.run_id == night.run_id), None)
    # a night already kept is judged against the nights before it, not those after
    nights = nights[: at + 1] if at is not None else [*nights, night]
    return [s for s in series_of(nights, k, limits) if s.points[-1].night.run_id == night.run_id]


def github_benchmark(night: Night) -> tuple[list[dict], list[dict]]:
    """github-action-benchmark's `customSmallerIsBetter` and `customBiggerIsBetter` entries of the
    night's gated figures: time and memory (smaller), quality (bigger)."""
    smaller, bigger = [], []
    for cell in night.cells.values():
        for figure, value in cell["figures"].items():
            if figure not in GATED:
                continue
            m = BY_KEY[figure]
            entry = {
                "name": f"{cell['model']} {cell['label']}: {figure}",
                "unit": m.unit,
                "value": value,
                "extra": f"run {night.run_id}, commit {night.commit or 'unknown'}, {night.accelerator}",
            }
            (bigger if GATED[figure][1] < 0 else smaller).append(entry)
    return smaller, bigger
