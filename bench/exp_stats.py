"""The statistics every benchmark reports, defined once, without scipy.

Throughput points: mean and 90 % confidence interval (Student's t) — the paper plots every
point with its 90 % confidence interval over repeated runs, the two-sided interval
mean ± t(0.95, n-1) · s / √n. Latencies: nearest-rank percentiles, p50/p99 in milliseconds.
"""

from __future__ import annotations

import math
import statistics

__all__ = ["ci90", "latency_summary", "percentile", "t95"]

# The 0.95 quantile of Student's t by degrees of freedom (two-sided 90 % interval).
_T95 = {
    1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
    9: 1.833, 10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746,
    17: 1.740, 18: 1.734, 19: 1.729, 20: 1.725, 25: 1.708, 30: 1.697, 40: 1.684, 60: 1.671,
    120: 1.658,
}  # fmt: skip


def t95(df: int) -> float:
    """t(0.95, df); between table rows the smaller df's value (a slightly wider interval)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if df > 120:
        return 1.645
    return _T95[max(k for k in _T95 if k <= df)]


def ci90(samples: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 90 % confidence interval (NaN with < 2 samples)."""
    if not samples:
        return math.nan, math.nan
    mean = statistics.fmean(samples)
    if len(samples) < 2:
        return mean, math.nan
    return mean, t95(len(samples) - 1) * statistics.stdev(samples) / math.sqrt(len(samples))


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``: nearest rank over the sorted values."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def latency_summary(seconds: list[float], digits: int = 3) -> dict[str, float]:
    """n, p50/p99, mean, min and max in milliseconds of latencies given in seconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), digits),
        "p99_ms": round(percentile(ms, 99), digits),
        "mean_ms": round(statistics.fmean(ms), digits),
        "min_ms": round(min(ms), digits),
        "max_ms": round(max(ms), digits),
    }
