"""`memory.auto=true` for a Trainer's own model: the plan its run folder recorded (a resumed run never plans
again), else the planner handed to the Trainer (gradwise.tools.planner.plan_config, set by the package) measured
on this model, its first global batch, its loss and counting functions, after the first-batch check."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from gradwise.config import Config, flatten, read_yaml, validate
from gradwise.errors import ConfigError, UserInputError
from gradwise.parallel.strategy import GradientSync
from gradwise.resolve import PLANNED_KEYS, resolve_config
from gradwise.train.checks import check_first_batch
from gradwise.train.pipeline import Pipeline
from gradwise.train.run_dir import written_by_gradwise
from gradwise.train.step import StepEngine


@dataclass
class TrainerRun:
    """What the planner measures a model of yours on."""

    model: nn.Module
    batch: Any  # one global batch, as the run reads it
    train_size: int | None
    loss_fn: Callable | None = None
    count_fn: Callable | None = None


def recorded_plan(cfg: Config, out_dir: Path | None, model: nn.Module) -> Config | None:
    """`cfg` with the plan `out_dir`'s config.yaml recorded, when gradwise wrote it for this model class, batch
    size and memory.budget; else None (plan afresh)."""
    path = out_dir / "config.yaml" if out_dir is not None else None
    if path is None or not path.is_file() or not written_by_gradwise(path):
        return None
    try:
        recorded = flatten(read_yaml(path))
    except (UserInputError, UnicodeDecodeError, ValueError):
        return None
    same_run = (recorded.get("memory.auto") is False and recorded.get("memory.budget") == cfg.memory.budget
                and recorded.get("model.class") == type(model).__name__
                and recorded.get("train.batch_size") == cfg.train.batch_size)
    if not same_run:
        return None
    tree = cfg.to_dict()
    for key in PLANNED_KEYS:
        section, _, name = key.rpartition(".")
        (tree[section] if section else tree)[name] = recorded.get(key)
    try:
        return validate(tree)
    except UserInputError:
        return None


def settle_plan(cfg: Config, model: nn.Module, data: dict[str, Pipeline | None], sync: GradientSync,
                planner: Callable[..., Config] | None, out_dir: Path | None, train_size: int | None,
                task: str | None, loss_fn: Callable | None, count_fn: Callable | None) -> Config:
    """The config to train with: memory.auto settled. Rank 0 decides (the recorded plan, or a fresh one) and
    every rank trains with its choice."""
    if not cfg.memory.auto:
        return cfg
    chosen = None
    if sync.is_main:
        chosen = recorded_plan(cfg, out_dir, model) or fresh_plan(cfg, model, data, planner, train_size, task,
                                                                  loss_fn, count_fn)
    if sync.world_size > 1:
        chosen = validate(sync.broadcast(chosen.to_dict() if chosen is not None else None))
    return chosen


def fresh_plan(cfg: Config, model: nn.Module, data: dict[str, Pipeline | None],
               planner: Callable[..., Config] | None, train_size: int | None, task: str | None,
               loss_fn: Callable | None, count_fn: Callable | None) -> Config:
    """The first-batch check (one line, before any trial), then the planner on this model and one global batch."""
    if planner is None:
        raise ConfigError("config error: memory.auto=true needs a planner (import gradwise, which hands the "
                          "Trainer gradwise.tools.planner.plan_config), or set train.accumulate, "
                          "memory.checkpoint and precision yourself")
    unplanned = cfg.thawed()
    unplanned.memory.auto = False
    trial = StepEngine(copy.deepcopy(model), resolve_config(unplanned, train_size), loss_fn=loss_fn,
                       count_fn=count_fn)
    check_first_batch(trial, data, task)
    del trial  # not counted in the trials' memory
    batch = data["train"].first_batch(cfg.train.batch_size)
    return planner(cfg, run=TrainerRun(model, batch, train_size, loss_fn, count_fn))
