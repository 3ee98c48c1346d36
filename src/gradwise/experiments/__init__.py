"""`gradwise repro NAME`: one module per claim of the seeds, each writing results.json,
results.md and plots into its output folder; `mean_ci` is the interval they report."""

from __future__ import annotations

import math
import statistics
from typing import Callable

from gradwise.errors import UserInputError

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for one value)."""
    m = statistics.fmean(values)
    return m, (T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
               if len(values) > 1 else 0.0)


def experiments() -> dict[str, Callable]:
    from gradwise.experiments import async_ps, depth, large_batch, memory, overfitting, precision

    return {"memory": memory.run, "large-batch": large_batch.run, "depth": depth.run,
            "overfitting": overfitting.run, "async": async_ps.run,
            "precision": precision.run}


def run_experiment(name: str, out_dir: str, quick: bool = False) -> int:
    available = experiments()
    if name not in available:
        raise UserInputError(f"usage error: unknown experiment '{name}' (available: {', '.join(available)})")
    available[name](out_dir, quick=quick)
    return 0
