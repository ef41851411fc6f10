"""Summaries of repeated measurements: median with min-max and interquartile range."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Figure", "percentile", "summarize"]


@dataclass(frozen=True)
class Figure:
    """One measured quantity over repeated runs, in the unit the caller names."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def iqr(self) -> tuple[float, float]:
        """First and third quartile; both equal the sample when there is only one."""
        if len(self.samples) < 2:
            return (self.samples[0], self.samples[0])
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return (q1, q3)

    def format(self, digits: int = 0, scale: float = 1.0) -> str:
        """Render as "median (min–max, n=3)" after dividing by `scale`."""
        median = _number(self.median / scale, digits)
        low = _number(self.low / scale, digits)
        high = _number(self.high / scale, digits)
        return f"{median} ({low}–{high}, n={len(self.samples)})"


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def summarize(samples: Sequence[float]) -> Figure:
    if not samples:
        raise ValueError("summarize needs at least one sample, got none")
    return Figure(tuple(float(s) for s in samples))


def percentile(sorted_values: Sequence[float], share: float) -> float:
    """Return the nearest-rank percentile (`share` in 0..1) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence is undefined")
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
