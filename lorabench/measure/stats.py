"""Summary statistics of repeated measurements (step times, epoch times, repeats).

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
