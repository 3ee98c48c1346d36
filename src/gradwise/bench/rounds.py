"""Same-start variants timed side by side: one step engine per setting, alternating within each round.

Shared by `gradwise bench memory` and `gradwise repro memory` (experiments import
this module; bench never imports experiments).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

from gradwise.config import load_config
from gradwise.data import build_data
from gradwise.memory.measure import ActivationMeter
from gradwise.nn import build_model
from gradwise.resolve import resolve_config
from gradwise.train import StepEngine, seed_everything

POLICIES = ["none", "all", "every:4", "sqrt"]


def kept_bytes(model, inputs) -> int:
    meter = ActivationMeter(model)
    with meter.track():
        out = model(inputs)
    del out
    return meter.bytes


def variant_engines(overrides: list[str], variants: dict[str, Callable[[Any], None]],
                    warmup: dict[str, float] | None = None):
    """(engines, x, y): one step engine per variant (each `variants[name](cfg)` edits a copy of the config),
    all from the same initial weights, warmed up by one step on the first batch (x, y); that step's seconds
    go into `warmup[name]` when given (a compiled engine compiles there)."""
    cfg = load_config(None, ["log.progress=off", *overrides])
    seed_everything(cfg.seed)
    data = build_data(cfg.data, context=cfg.model.context)
    initial = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    x, y = (t[: cfg.train.batch_size] for t in data.train.tensors)
    engines = {}
    for name, edit in variants.items():
        trial = cfg.model_copy(deep=True)
        edit(trial)
        engines[name] = StepEngine(copy.deepcopy(initial), resolve_config(trial, len(data.train)))
        t0 = time.perf_counter()
        engines[name].train_step((x, y))  # warm-up, optimizer state
        if warmup is not None:
            warmup[name] = time.perf_counter() - t0
    return engines, x, y


def time_rounds(engines: dict[str, StepEngine], x, y, rounds: int, steps: Callable[[str], int]
                ) -> dict[str, list[float]]:
    """Seconds per step of each engine, `rounds` times, the engines alternating within each round."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            n = steps(name)
            t0 = time.perf_counter()
            for _ in range(n):
                engine.train_step((x, y))
            times[name].append((time.perf_counter() - t0) / n)
    return times


def compare_policies(overrides: list[str], rounds: int, steps: int) -> list[dict[str, Any]]:
    def set_policy(name: str) -> Callable[[Any], None]:
        return lambda cfg: setattr(cfg.memory, "checkpoint", name)

    engines, x, y = variant_engines(overrides, {p: set_policy(p) for p in POLICIES})
    times = time_rounds(engines, x, y, rounds, lambda _name: steps)
    rows = []
    base_bytes = kept_bytes(engines["none"].model, x)
    for policy in POLICIES:
        kept = kept_bytes(engines[policy].model, x)
        ratios = [t / b for t, b in zip(times[policy], times["none"])]
        rows.append({
            "policy": policy,
            "activation_bytes": kept,
            "memory_ratio_none_over_policy": base_bytes / kept,
            "ms_per_step": statistics.median(times[policy]) * 1e3,
            "time_ratio_vs_none": statistics.median(ratios),
        })
    return rows
