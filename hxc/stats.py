"""Latency statistics: percentiles over timed calls, one definition for `hxc bench`'s
profiles, the pool's live figures and the manifest that records them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call over `iterations` timed calls."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    min_ms: float
    iterations: int

    @property
    def spread(self) -> float:
        """(p90 - p50) / p50: how noisy the run was."""
        return (self.p90_ms - self.p50_ms) / self.p50_ms if self.p50_ms else 0.0

    @property
    def p99_observed(self) -> bool:
        """Whether p99 rests on enough calls to be a tail observation (at least one call
        at or above it) rather than an interpolation between the slowest few."""
        return self.iterations >= P99_MIN_ITERATIONS


# Below this many timed calls, p99 is not something to judge a latency target by.
P99_MIN_ITERATIONS = 100


def latency_stats(samples_ms: list[float]) -> LatencyStats:
    xs = sorted(samples_ms)
    return LatencyStats(
        p50_ms=_percentile(xs, 50),
        p90_ms=_percentile(xs, 90),
        p99_ms=_percentile(xs, 99),
        mean_ms=statistics.fmean(xs),
        stdev_ms=statistics.stdev(xs) if len(xs) > 1 else 0.0,
        min_ms=xs[0],
        iterations=len(xs),
    )


def _percentile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)
