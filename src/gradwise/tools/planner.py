"""The memory planner: measure candidate (micro-batch, checkpoint policy, precision) settings
with a few trial steps each and pick the fastest one that fits a memory budget.

The global batch never changes: a smaller micro-batch means more accumulation.
Memory of a candidate = parameters + gradients + optimizer state + the largest
micro-batch's activations kept for backward (on CUDA: the allocator's peak).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gradwise.config import Config, parse_bytes
from gradwise.data import build_data
from gradwise.errors import UserInputError
from gradwise.memory.measure import (
    ActivationMeter,
    cuda_peak,
    format_bytes,
    state_bytes,
)
from gradwise.nn import build_model
from gradwise.resolve import resolve_config
from gradwise.train.randomness import capture_rng, restore_rng, seed_everything
from gradwise.train.step import StepEngine

POLICIES = ("none", "sqrt", "all")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class StepProfile:
    activation_bytes: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    cuda_peak_bytes: int | None
    seconds_per_step: float
    samples_per_second: float

    @property
    def total_bytes(self) -> int:
        if self.cuda_peak_bytes is not None:
            return self.cuda_peak_bytes
        return self.activation_bytes + self.params_bytes + self.grads_bytes + self.optimizer_bytes


class Metering:
    """A step engine's `forward_context`: while `on`, each forward runs under a fresh ActivationMeter (the
    activations kept for backward); otherwise nothing."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.meters, self.on = model, [], False

    def __call__(self):
        if not self.on:
            return contextlib.nullcontext()
        self.meters.append(ActivationMeter(self.model))
        return self.meters[-1].track()


def profile_step(engine: StepEngine, metering: Metering, inputs, targets, steps: int = 3,
                 warmup: int = 1) -> StepProfile:
    """Run `warmup + steps` real training steps of `engine` (built with `metering` as its forward context) on
    one batch; measure memory and time.

    The engine's parameters change (these are real updates): profile a copy you can discard.
    """
    device = engine.device
    inputs, targets = inputs.to(device), targets.to(device)
    for _ in range(warmup):
        engine.train_step((inputs, targets))  # allocates optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    metering.on = True
    engine.train_step((inputs, targets))
    metering.on = False
    peak = cuda_peak(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.train_step((inputs, targets))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    sizes = state_bytes(engine.model, engine.optimizer)
    return StepProfile(
        activation_bytes=max(m.bytes for m in metering.meters),
        params_bytes=sizes["params"],
        grads_bytes=sizes["grads"],
        optimizer_bytes=sizes["optimizer_state"],
        cuda_peak_bytes=peak,
        seconds_per_step=seconds,
        samples_per_second=len(targets) / seconds,
    )


def candidate_micro_batches(batch_size: int, limit: int = 5) -> list[int]:
    """Micro-batch counts 1, 2, 4, ... (at most `limit`, each leaving at least one sample)."""
    counts, n = [], 1
    while n <= batch_size and len(counts) < limit:
        counts.append(n)
        n *= 2
    return counts


def plan(cfg: Config, budget: int, trial_steps: int = 3, precisions=PRECISIONS, policies=POLICIES,
         progress=None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Measure every candidate; return (table rows, the fastest row that fits or None)."""
    rng = capture_rng()
    try:
        seed_everything(cfg.seed)
        data = build_data(cfg.data, context=cfg.model.context)
        initial = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
        idx = torch.arange(min(cfg.train.batch_size, len(data.train)))
        inputs, targets = (t[idx] for t in data.train.tensors)
        rows = []
        for micro in candidate_micro_batches(cfg.train.batch_size):
            for policy in policies:
                for precision in precisions:
                    trial = cfg.model_copy(deep=True)
                    trial.train.accumulate, trial.train.micro_batch_size = micro, None
                    trial.memory.checkpoint, trial.memory.auto = policy, False
                    trial.train.compile = False  # a trial of a few steps would time the compilation
                    trial.precision = precision
                    model = copy.deepcopy(initial)
                    metering = Metering(model)
                    engine = StepEngine(model, resolve_config(trial, len(data.train)), forward_context=metering)
                    prof = profile_step(engine, metering, inputs, targets, steps=trial_steps)
                    row = {"accumulate": micro, "micro_batch": -(-cfg.train.batch_size // micro),
                           "checkpoint": policy, "precision": precision, "memory_bytes": prof.total_bytes,
                           "samples_per_s": prof.samples_per_second, "fits": prof.total_bytes <= budget,
                           **{k: v for k, v in asdict(prof).items() if k.endswith("bytes")}}
                    rows.append(row)
                    if progress:
                        progress(row)
    finally:
        restore_rng(rng)
    fitting = [r for r in rows if r["fits"]]
    best = max(fitting, key=lambda r: r["samples_per_s"]) if fitting else None
    return rows, best


def format_table(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    lines = ["| accumulate | micro-batch | checkpoint | precision | memory | samples/s | fits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **best**" if r is best else ""
        lines.append(f"| {r['accumulate']} | {r['micro_batch']} | {r['checkpoint']} | {r['precision']} | "
                     f"{format_bytes(r['memory_bytes'])} | {r['samples_per_s']:.0f} | "
                     f"{'yes' if r['fits'] else 'no'}{mark} |")
    return "\n".join(lines)


def no_fit_error(rows: list[dict[str, Any]], budget_text: str) -> UserInputError:
    smallest = min(rows, key=lambda r: r["memory_bytes"])
    return UserInputError(
        f"plan error: nothing fits memory.budget={budget_text}; the smallest footprint found is "
        f"{format_bytes(smallest['memory_bytes'])} (train.accumulate={smallest['accumulate']}, "
        f"memory.checkpoint={smallest['checkpoint']}, precision={smallest['precision']})"
    )


def apply_choice(cfg: Config, best: dict[str, Any]) -> Config:
    """A copy of `cfg` with the chosen setting written in and memory.auto switched off
    (so a resumed run keeps the same trajectory instead of planning again)."""
    chosen = cfg.model_copy(deep=True)
    chosen.train.accumulate, chosen.train.micro_batch_size = best["accumulate"], None
    chosen.memory.checkpoint, chosen.memory.auto = best["checkpoint"], False
    chosen.precision = best["precision"]
    return chosen


def plan_config(cfg: Config, trial_steps: int = 3) -> Config:
    """For `memory.auto=true`: plan against `memory.budget` and return the config to train with."""
    budget = parse_bytes(cfg.memory.budget, "memory.budget")
    print(f"planning: measuring settings against memory.budget={cfg.memory.budget} ...", file=sys.stderr, flush=True)
    rows, best = plan(cfg, budget, trial_steps)
    if best is None:
        raise no_fit_error(rows, cfg.memory.budget)
    print(f"planning: chose train.accumulate={best['accumulate']} memory.checkpoint={best['checkpoint']} "
          f"precision={best['precision']} ({format_bytes(best['memory_bytes'])}, "
          f"{best['samples_per_s']:.0f} samples/s)", file=sys.stderr, flush=True)
    return apply_choice(cfg, best)
