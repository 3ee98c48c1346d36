"""`gradwise repro NAME`: one module per claim of the seeds, each writing results.json,
results.md and plots into its output folder."""

from __future__ import annotations

from typing import Callable

from gradwise.errors import UserInputError


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
