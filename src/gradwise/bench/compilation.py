"""compile: `train.compile` x precision on the built-in default jobs, against fp32 eager in the same run.

Four engines per job (fp32 / bf16, eager / compiled, same initial weights) step the same batch in
alternating rounds; each row is the median of its per-round ratios to fp32 eager. A compiled engine's first
step (tracing and code generation, with an empty inductor cache made for this run) is reported apart as
its warm-up; the eager engines' first step is there for scale.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from typing import Any, Callable

from gradwise.bench.matmul import JOBS
from gradwise.bench.rounds import time_rounds, variant_engines

VARIANTS = {"fp32 eager": ("fp32", False), "bf16 eager": ("bf16", False),
            "fp32 compiled": ("fp32", True), "bf16 compiled": ("bf16", True)}


def _setting(precision: str, compiled: bool) -> Callable[[Any], None]:
    def edit(cfg) -> None:
        cfg.precision = precision
        cfg.train.compile = compiled
    return edit


def run(steps: int = 300, repeats: int = 5) -> dict[str, Any]:
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="gradwise-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold on-disk cache: nothing from an earlier run is reused
        try:
            rows = _measure_jobs(steps, repeats)
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
    return {"steps": steps, "repeats": repeats, "rows": rows,
            "notes": ["speed-up: median over alternating rounds of (fp32 eager s/step) / (this setting's s/step); "
                      "> 1 is faster. torch.compile's default mode and inductor backend; fp32 master weights, "
                      "autocast in bf16; first step: one step's wall time including compilation (empty on-disk "
                      "cache)."]}


def _measure_jobs(steps: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for job, overrides in JOBS.items():
        warmup: dict[str, float] = {}
        engines, x, y = variant_engines(["diagnostics.every=0", *overrides],
                                        {name: _setting(*v) for name, v in VARIANTS.items()}, warmup)
        first = engines["fp32 eager"]
        slow = first.cfg.model.name == "transformer"  # about a second per step: fewer, shorter rounds
        n = max(2, min(steps, 5)) if slow else steps
        times = time_rounds(engines, x, y, max(2, min(repeats, 3)) if slow else repeats, lambda _name: n)
        base = times["fp32 eager"]
        for name, t in times.items():
            rows.append({"job": job, "setting": name, "ms/step": statistics.median(t) * 1e3,
                         "speed-up vs fp32 eager": statistics.median([b / a for a, b in zip(t, base)]),
                         "first step s (compile warm-up)": warmup[name]})
    return rows
