"""Summary statistics of repeated measurements (step times, epoch times, repeats), and the mean of
independent ones (seeds) with its confidence interval.

    python -c "from lorabench.measure.stats import Summary; print(Summary.of([1, 2, 3, 10]).p90)"

Percentiles interpolate linearly between order statistics (numpy's default), so p50 of an
even count is the mean of the two middle values. Formatting lives in report.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    values: tuple[float, ...]

    @classmethod
    def of(cls, values) -> "Summary":
        vals = tuple(float(v) for v in values)
        if not vals:
            raise ValueError("a summary needs at least one value")
        return cls(vals)

    @property
    def n(self) -> int:
        return len(self.values)

    def percentile(self, q: float) -> float:
        """q in [0, 100], linear interpolation between the closest ranks."""
        s = sorted(self.values)
        k = (len(s) - 1) * q / 100.0
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    @property
    def median(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def stdev(self) -> float:
        """Sample standard deviation (n - 1); 0 for a single value."""
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def stdev_pct(self) -> float:
        """Coefficient of variation in % of the mean."""
        return 100.0 * self.stdev / self.mean if self.mean else 0.0


# Student's t, two-sided 95 %: t(0.975, df) for df = n - 1 (tables of the t distribution); past 30
# degrees of freedom the normal's 1.96 is within 4 % of it.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T975.update({12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042})


def t975(df: int) -> float:
    """t(0.975, df), the largest tabulated df not above `df` (a slightly wider interval, never narrower)."""
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


@dataclass(frozen=True)
class Interval:
    """The mean of independent measurements (seeds) and its 95 % confidence interval by Student's t:
    mean +- t(0.975, n - 1) x s / sqrt(n). One measurement has no interval (lo = hi = the value,
    `n` says so)."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values) -> "Interval":
        s = Summary.of(values)
        if s.n < 2:
            return cls(s.mean, s.mean, s.mean, 1)
        half = t975(s.n - 1) * s.stdev / math.sqrt(s.n)
        return cls(s.mean, s.mean - half, s.mean + half, s.n)

    @property
    def spread(self) -> bool:
        """Whether there is an interval at all (two or more measurements)."""
        return self.n > 1

    def overlaps(self, other: "Interval") -> bool:
        return self.lo <= other.hi and other.lo <= self.hi
