"""Percentile summaries of latency samples."""

from __future__ import annotations

import math

PERCENTILES = (50, 90, 95, 99)


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of a non-empty list."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p95, p99 (NaN when there are no samples)."""
    out = {"mean": sum(values) / len(values) if values else math.nan}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p)
    return out
