"""The memory planner: measure candidate (micro-batch, checkpoint policy, precision) settings
with a few trial steps each and pick the fastest one that fits a memory budget.

The global batch never changes: a smaller micro-batch means more accumulation.
Memory of a candidate = parameters + gradients + optimizer state + the largest
micro-batch's activations kept for backward (on CUDA: the allocator's peak).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gradwise.arguments import budget_argument, check_callable, check_count, check_type, config_argument
from gradwise.config import Config, parse_bytes
from gradwise.errors import ArgumentValueError, UserInputError
from gradwise.memory.measure import (
    ActivationMeter,
    cuda_peak,
    format_bytes,
    state_bytes,
)
from gradwise.memory.checkpointing import CheckpointedSegments, repeated_blocks
from gradwise.resolve import resolve_config
from gradwise.train import Trainer
from gradwise.train.factories import config_data, config_loss, config_model
from gradwise.parallel.fsdp import shard_units
from gradwise.parallel.strategy import GradientSync, SingleProcess
from gradwise.train.batch import fetch_batch, rows as batch_rows, split, to_device
from gradwise.train.pipeline import adopt_settings, as_pipeline
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
    gathered_bytes: int = 0  # FSDP: whole weights a process holds besides its shards (`gathered_bytes`)

    @property
    def total_bytes(self) -> int:
        if self.cuda_peak_bytes is not None:
            return self.cuda_peak_bytes
        return (self.activation_bytes + self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.gathered_bytes)


def gathered_bytes(model: torch.nn.Module, cfg: Config) -> int:
    """Whole (fp32) weights an FSDP process holds besides its shards: the root's own parameters, which FSDP keeps
    gathered from forward to backward, and the largest unit's while it computes (gradwise.parallel.fsdp)."""
    units = shard_units(model, cfg.train.shard_modules)
    inside = {id(p) for unit in units for p in unit.parameters()}
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    largest = max((sum(p.numel() * p.element_size() for p in unit.parameters()) for unit in units), default=0)
    return root + largest


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


def profile_step(engine: StepEngine, metering: Metering, batch: Any, steps: int = 3,
                 warmup: int = 1) -> StepProfile:
    """Run `warmup + steps` real training steps of `engine` (built with `metering` as its forward context) on
    one batch (any structure: gradwise.train.batch); measure memory and time.

    The engine's parameters change (these are real updates): profile a copy you can discard.
    """
    device = engine.device
    batch = to_device(batch, device)
    for _ in range(warmup):
        engine.train_step(batch)  # allocates optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    metering.on = True
    engine.train_step(batch)
    metering.on = False
    peak = cuda_peak(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.train_step(batch)
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
        samples_per_second=batch_rows(batch) / seconds,
    )


def candidate_micro_batches(batch_size: int, limit: int = 5) -> list[int]:
    """Micro-batch counts 1, 2, 4, ... (at most `limit`, each leaving at least one sample)."""
    counts, n = [], 1
    while n <= batch_size and len(counts) < limit:
        counts.append(n)
        n *= 2
    return counts


def checkpoint_choices(model: torch.nn.Module, policies=POLICIES) -> list[str]:
    """What the planner may checkpoint in `model`: gradwise's block stacks by policy (`none`, `sqrt`, `all`), or
    for any other model `none` and its repeated blocks (gradwise.memory.checkpointing.repeated_blocks: one
    choice naming their classes, e.g. `GPT2Block`)."""
    if any(isinstance(m, CheckpointedSegments) for m in model.modules()):
        return list(policies)
    blocks = repeated_blocks(model)
    return ["none", ",".join(blocks)] if blocks else ["none"]


def measure(initial: torch.nn.Module, batch: Any, cfg: Config, train_size: int | None, budget: int,
            trial_steps: int = 3, precisions=PRECISIONS, policies=POLICIES, progress=None,
            loss_fn: Any = None, count_fn: Any = None, syncs: dict[str, GradientSync] | None = None
            ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Train a copy of `initial` on `batch` (one global batch) under every candidate setting; return (table
    rows, the fastest row that fits `budget` bytes, or None). The RNG is left as it was.

    `syncs` ({"ddp": ..., "fsdp": ...}: a torchrun group's strategies, `gradwise plan --nproc N`) makes the
    strategy a candidate too: every rank trains each trial on its share of the batch, a row's memory is a
    rank's (FSDP: its shards of parameters, gradients and optimizer state, plus the whole weights it gathers:
    `gathered_bytes`) and its throughput the group's; rank 0's figures are every rank's."""
    rng = capture_rng()
    rows = []
    n = batch_rows(batch)
    try:
        for strategy, sync in (syncs or {None: SingleProcess()}).items():
            local = split(batch, sync.shard(n), n)  # this rank's rows (one process: all of them)
            gathered = gathered_bytes(initial, cfg) if strategy == "fsdp" else 0
            for micro in candidate_micro_batches(n // sync.world_size):  # the smallest share: alike on every rank
                for policy in checkpoint_choices(initial, policies):
                    for precision in precisions:
                        choice = {"accumulate": micro, "checkpoint": policy, "precision": precision,
                                  **({"strategy": strategy} if strategy else {})}
                        trial = apply_choice(cfg, choice)
                        trial.train.compile = False  # a trial of a few steps would time the compilation
                        model = copy.deepcopy(initial)
                        metering = Metering(model)
                        engine = StepEngine(model, resolve_config(trial, train_size), sync=sync,
                                            forward_context=metering, loss_fn=loss_fn, count_fn=count_fn)
                        prof = profile_step(engine, metering, local, steps=trial_steps)
                        prof.gathered_bytes = gathered
                        del engine, model, metering
                        if prof.cuda_peak_bytes is not None:  # the allocator's peak must not hold the last trial
                            gc.collect()  # (its wrappers' hooks are cycles); on CPU the figure counts live tensors
                        row = {**choice, "micro_batch": -(-batch_rows(local) // micro),
                               "memory_bytes": prof.total_bytes,
                               "samples_per_s": prof.samples_per_second * sync.world_size,
                               "fits": prof.total_bytes <= budget,
                               **{k: v for k, v in asdict(prof).items() if k.endswith("bytes")}}
                        rows.append(row)
                        if progress and sync.is_main:
                            progress(row)
            rows = sync.broadcast(rows)  # rank 0's figures: every rank decides alike
    finally:
        restore_rng(rng)
    fitting = [r for r in rows if r["fits"]]
    best = max(fitting, key=lambda r: r["samples_per_s"]) if fitting else None
    return rows, best


def plan(cfg: Config, budget: int, trial_steps: int = 3, precisions=PRECISIONS, policies=POLICIES,
         progress=None, syncs: dict[str, GradientSync] | None = None
         ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The model and data `cfg` names (built-in, or yours by import path: gradwise.train.factories): measure every
    candidate (and strategy: `syncs`, see `measure`); return (table rows, the fastest row that fits or None)."""
    rng = capture_rng()
    try:
        seed_everything(cfg.seed)
        data = config_data(cfg)
        initial = config_model(cfg, data)
    finally:
        restore_rng(rng)
    if cfg.model.factory is not None:  # a model of yours: the Trainer's first-batch check and pipeline
        result = plan_model(initial, data.train, budget=budget, config=cfg, trial_steps=trial_steps,
                            precisions=precisions, progress=progress, val_data=data.val, test_data=data.test,
                            collate_fn=data.collate_fn, loss_fn=config_loss(cfg), syncs=syncs)
        return result.rows, result.best
    batch = fetch_batch(data.train, torch.arange(min(cfg.train.batch_size, len(data.train))))
    return measure(initial, batch, cfg, len(data.train), budget, trial_steps, precisions, policies, progress,
                   syncs=syncs)


@dataclass
class Plan:
    """`gradwise.plan`'s answer: every measured row, the fastest that fits (None: nothing does) and the config to
    train with (the choice written in; None when nothing fits)."""

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    config: Config | None

    def table(self) -> str:
        return format_table(self.rows, self.best)


def plan_model(model: torch.nn.Module, train_data: Any, *, budget: int | str, config: Config | None = None,
               trial_steps: int = 3, precisions=PRECISIONS, progress=None,
               syncs: dict[str, GradientSync] | None = None, **trainer_args: Any) -> Plan:
    """Plan micro-batch, activation checkpointing (gradwise's block stacks, or your model's repeated blocks) and
    precision for your model and data under `budget` (bytes, or text such as "2GiB"). `trainer_args` are
    Trainer's (loss_fn, collate_fn, count_fn, task, val_data, test_data, metrics): the same first-batch check
    and one-line errors. The model is left as it was (trials train copies)."""
    config = config_argument("config", config)
    check_count("trial_steps", trial_steps)
    if isinstance(precisions, str) or not isinstance(precisions, (list, tuple)) or \
            not set(precisions) <= set(PRECISIONS) or not precisions:
        raise ArgumentValueError(f"argument error: precisions={precisions!r}; allowed: a list of "
                                 f"{', '.join(PRECISIONS)}")
    check_callable("progress", progress, "a function progress(row) called after each trial")
    check_type("syncs", syncs, dict, "a dict {'ddp': GradientSync, 'fsdp': GradientSync} (under torchrun)")
    cfg = config.thawed()
    cfg.memory.auto = False
    limit = budget_argument("budget", budget)
    if syncs:  # a DataLoader's batch is per process: the group's global batch is N of them
        world = next(iter(syncs.values())).world_size
        pipeline = as_pipeline(train_data, "train_data", trainer_args.pop("collate_fn", None))
        cfg, train_data = adopt_settings(cfg, pipeline, world), pipeline.dataset
        trainer_args["collate_fn"] = pipeline.collate_fn
    trainer = Trainer(copy.deepcopy(model), train_data, config=cfg, sync=SingleProcess(),  # the checks, the
                      **trainer_args)  # pipeline (in this process: the trials run on the group, `syncs`)
    batch = trainer.data["train"].first_batch(trainer.cfg.train.batch_size)
    resolved, train_size = trainer.cfg, trainer.train_size
    del trainer  # not counted in the trials' memory
    rows, best = measure(model, batch, resolved, train_size, limit, trial_steps, precisions, progress=progress,
                         loss_fn=trainer_args.get("loss_fn"), count_fn=trainer_args.get("count_fn"), syncs=syncs)
    return Plan(rows, best, apply_choice(config, best) if best else None)


def format_table(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """The rows as a markdown table (a strategy column when strategies were candidates; memory per process)."""
    strategies = any("strategy" in r for r in rows)
    lines = [f"|{' strategy |' if strategies else ''} accumulate | micro-batch | checkpoint | precision | memory | "
             "samples/s | fits |", "|---" * (7 + strategies) + "|"]
    for r in rows:
        mark = " **best**" if r is best else ""
        strategy = f" {r.get('strategy')} |" if strategies else ""
        lines.append(f"|{strategy} {r['accumulate']} | "
                     f"{r['micro_batch']} | {r['checkpoint']} | {r['precision']} | "
                     f"{format_bytes(r['memory_bytes'])} | {r['samples_per_s']:.0f} | "
                     f"{'yes' if r['fits'] else 'no'}{mark} |")
    return "\n".join(lines)


def no_fit_error(rows: list[dict[str, Any]], budget_text: str) -> UserInputError:
    smallest = min(rows, key=lambda r: r["memory_bytes"])
    return UserInputError(
        f"plan error: nothing fits memory.budget={budget_text}; the smallest footprint found is "
        f"{format_bytes(smallest['memory_bytes'])} ({setting_keys(smallest)})"
    )


def apply_choice(cfg: Config, best: dict[str, Any]) -> Config:
    """A copy of `cfg` with the chosen setting written in and memory.auto switched off
    (so a resumed run keeps the same trajectory instead of planning again). A checkpoint choice that is not a
    policy names block classes: memory.modules."""
    chosen = cfg.thawed()
    chosen.train.micro_batch_size = None  # first: a micro-batch size and accumulation > 1 are exclusive
    chosen.train.accumulate = best["accumulate"]
    if best["checkpoint"] in POLICIES:
        chosen.memory.checkpoint, chosen.memory.modules = best["checkpoint"], []
    else:
        chosen.memory.checkpoint, chosen.memory.modules = "none", best["checkpoint"].split(",")
    chosen.memory.auto = False
    chosen.precision = best["precision"]
    if "strategy" in best:
        chosen.train.strategy = best["strategy"]
    return chosen


def setting_keys(row: dict[str, Any]) -> str:
    """A row's setting as the keys it sets."""
    checkpoint = (f"memory.checkpoint={row['checkpoint']}" if row["checkpoint"] in POLICIES
                  else f"memory.modules=[{row['checkpoint']}]")
    strategy = f" train.strategy={row['strategy']}" if "strategy" in row else ""
    return f"train.accumulate={row['accumulate']} {checkpoint} precision={row['precision']}{strategy}"


def plan_config(cfg: Config, trial_steps: int = 3, run: Any = None) -> Config:
    """For `memory.auto=true`: plan against `memory.budget` and return the config to train with. `run` (a
    TrainerRun: the trainer's model, first global batch, loss and counting functions) plans on a model of
    yours; without it, on the config's built-in model and data."""
    budget = parse_bytes(cfg.memory.budget, "memory.budget")
    print(f"planning: measuring settings against memory.budget={cfg.memory.budget} ...", file=sys.stderr, flush=True)
    if run is None:
        rows, best = plan(cfg, budget, trial_steps)
    else:
        rows, best = measure(run.model, run.batch, cfg, run.train_size, budget, trial_steps, loss_fn=run.loss_fn,
                             count_fn=run.count_fn)
    if best is None:
        raise no_fit_error(rows, cfg.memory.budget)
    print(f"planning: chose {setting_keys(best)} ({format_bytes(best['memory_bytes'])}, "
          f"{best['samples_per_s']:.0f} samples/s)", file=sys.stderr, flush=True)
    return apply_choice(cfg, best)
