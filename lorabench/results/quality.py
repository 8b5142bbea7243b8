"""What a method costs in quality, from a group's rows: accuracy across seeds with its interval,
the time to reach a target, and what was forgotten of the source task.

    lorabench run --preset quality          # 3 seeds: every figure gets its interval

Every figure is over seeds (one row per seed; the repeats of a seed measure the machine, not the
method, so a seed's first finished row stands for it). The target is TARGET_FRACTION of full
fine-tuning's best eval accuracy in the same group (its mean over full's seeds), unless the user
set one (`Goal`: an eval accuracy to reach, or an eval loss to get under); a row reaches it at the first point of its curve (`Row.curve`: an evaluation every
--eval-every steps and after each epoch) at or above it, after that point's training seconds
(evaluations left out). Over seeds, time to target is the mean of the seeds that reached it, and
says how many did; with five or more, the fastest and the slowest are dropped first (MLPerf's
rule for time to train).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..measure.stats import Interval
from .metrics import is_number
from .rows import Row

TARGET_FRACTION = 0.95  # of full fine-tuning's best accuracy: the default target
TRIM_FROM = 5  # seeds from which the fastest and slowest time to target are dropped (MLPerf)


def per_seed(rows: list[Row]) -> list[Row]:
    """One finished row per seed, the first of each."""
    return list({r.cell.seed: r for r in reversed([r for r in rows if r.ok])}.values())[::-1]


def over_seeds(rows: list[Row], key: str) -> Interval | None:
    """The figure `key` over the seeds that measured it, with its interval; None where none did."""
    values = [r.metrics[key] for r in per_seed(rows) if is_number(r.metrics.get(key))]
    return Interval.of(values) if values else None


BETTER = {"eval_accuracy": max, "eval_loss": min}  # which way each of a curve's figures improves


def best(row: Row, key: str = "eval_accuracy") -> float | None:
    """The best `key` (eval accuracy or loss) on the row's curve, else its final one."""
    points = [p[key] for p in row.curve if is_number(p.get(key))]
    final = row.metrics.get(f"final_{key}")
    return BETTER[key](points) if points else (final if is_number(final) else None)


@dataclass(frozen=True)
class Target:
    """A quality to reach: an eval accuracy at least, or an eval loss at most (`key`), and how it
    was set (`said`)."""

    key: str  # "eval_accuracy" or "eval_loss", as a curve's points name them
    value: float
    said: str

    @property
    def on_accuracy(self) -> bool:
        return self.key == "eval_accuracy"

    def met(self, value: float) -> bool:
        return value >= self.value if self.on_accuracy else value <= self.value


@dataclass(frozen=True)
class Goal:
    """The target the user set (`--target-accuracy`, `--target-loss`: at most one), else
    TARGET_FRACTION of full fine-tuning's best accuracy, its mean over full's seeds."""

    accuracy: float | None = None
    loss: float | None = None

    def target(self, full: list[Row] | None) -> Target | None:
        """The target of a group whose full fine-tuning rows are `full` (None: none in it)."""
        if self.accuracy is not None:
            return Target("eval_accuracy", self.accuracy, f"eval accuracy {self.accuracy:g}, as given")
        if self.loss is not None:
            return Target("eval_loss", self.loss, f"eval loss {self.loss:g}, as given")
        bests = [b for b in (best(r) for r in per_seed(full or [])) if b is not None]
        if not bests:
            return None
        value = TARGET_FRACTION * sum(bests) / len(bests)
        return Target(
            "eval_accuracy",
            value,
            f"{TARGET_FRACTION:.0%} of full fine-tuning's best eval accuracy, {value:.4f}",
        )


def reached(row: Row, target: Target) -> tuple[float, int] | None:
    """(training seconds, optimizer steps) at the first point of the row's curve that meets
    `target`; None where it never got there."""
    for p in row.curve:
        if is_number(p.get(target.key)) and target.met(p[target.key]):
            return p["train_s"], p["step"]
    return None


@dataclass(frozen=True)
class TimeToTarget:
    target: Target
    seconds: Interval | None  # over the seeds that reached it (trimmed from TRIM_FROM seeds on)
    steps: Interval | None
    reached: int  # seeds that reached it
    seeds: int
    best: float | None  # the best value of the target's figure any seed got

    @property
    def how(self) -> str:
        """How the seeds were summarised."""
        trimmed = " after dropping the fastest and the slowest" if self.reached >= TRIM_FROM else ""
        return f"mean of the {self.reached} of {self.seeds} seeds that reached it{trimmed}"


def time_to_target(rows: list[Row], target: Target) -> TimeToTarget:
    seeds = per_seed(rows)
    hits = sorted((h for h in (reached(r, target) for r in seeds) if h is not None), key=lambda h: h[0])
    kept = hits[1:-1] if len(hits) >= TRIM_FROM else hits
    bests = [b for b in (best(r, target.key) for r in seeds) if b is not None]
    return TimeToTarget(
        target,
        Interval.of([s for s, _ in kept]) if kept else None,
        Interval.of([n for _, n in kept]) if kept else None,
        len(hits),
        len(seeds),
        BETTER[target.key](bests) if bests else None,
    )


def relative(rows: list[Row], full: list[Row], key: str = "final_eval_accuracy") -> Interval | None:
    """`key` as a fraction of full fine-tuning's mean over its seeds, over this variant's seeds."""
    base = over_seeds(full, key)
    if base is None or not base.mean:
        return None
    values = [r.metrics[key] / base.mean for r in per_seed(rows) if is_number(r.metrics.get(key))]
    return Interval.of(values) if values else None
