"""The intervals the experiments report: a mean and its 95% t interval over seeds, and a paired difference."""

from __future__ import annotations

import math
import statistics

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for one value)."""
    m = statistics.fmean(values)
    return m, (T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
               if len(values) > 1 else 0.0)


def paired(a: list[dict], b: list[dict], key: str) -> tuple[float, float]:
    """Mean and 95% half-width of `key` in runs `a` minus runs `b`, seed by seed."""
    by_seed = {r["seed"]: r[key] for r in b}
    return mean_ci([r[key] - by_seed[r["seed"]] for r in a])
