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
from gradwise.errors import ConfigError
from gradwise.parallel.strategy import GradientSync
from gradwise.resolve import PLANNED_KEYS, resolve_config
from gradwise.train.checks import check_first_batch
from gradwise.train.pipeline import Pipeline
from gradwise.train.step import StepEngine


@dataclass
class TrainerRun:
    """What the planner measures a model of yours on."""

    model: nn.Module
    batch: Any  # one global batch, as the run reads it
    train_size: int | None
    loss_fn: Callable | None = None
    count_fn: Callable | None = None


def recorded_plan(cfg: Config, out_dir: Path | None) -> Config | None:
    """`cfg` with the plan that `out_dir`'s config.yaml recorded for the same memory.budget, or None."""
    path = out_dir / "config.yaml" if out_dir is not None else None
    if path is None or not path.is_file():
        return None
    recorded = flatten(read_yaml(path))
    if recorded.get("memory.auto") is not False or recorded.get("memory.budget") != cfg.memory.budget:
        return None
    planned = cfg.thawed()
    for key in PLANNED_KEYS:
        section, name = key.split(".", 1) if "." in key else (None, key)
        value = recorded.get(key)
        if section is None:
            setattr(planned, name, value)
        else:
            setattr(getattr(planned, section), name, value)
    return planned


def settle_plan(cfg: Config, model: nn.Module, data: dict[str, Pipeline | None], sync: GradientSync,
                planner: Callable[..., Config] | None, out_dir: Path | None, train_size: int | None,
                task: str | None, loss_fn: Callable | None, count_fn: Callable | None) -> Config:
    """The config to train with: memory.auto settled (every rank trains with rank 0's plan)."""
    if not cfg.memory.auto:
        return cfg
    chosen = recorded_plan(cfg, out_dir)
    if chosen is None:
        if planner is None:
            raise ConfigError("config error: memory.auto=true needs a planner (import gradwise, which hands the "
                              "Trainer gradwise.tools.planner.plan_config), or set train.accumulate, "
                              "memory.checkpoint and precision yourself")
        unplanned = cfg.thawed()
        unplanned.memory.auto = False
        trial = StepEngine(copy.deepcopy(model), resolve_config(unplanned, train_size), loss_fn=loss_fn,
                           count_fn=count_fn)
        check_first_batch(trial, data, task)  # a model and batch that do not fit: one line, before any trial
        batch = data["train"].first_batch(cfg.train.batch_size)
        chosen = planner(cfg, run=TrainerRun(model, batch, train_size, loss_fn, count_fn))
    if sync.world_size > 1:
        chosen = validate(sync.broadcast(chosen.to_dict()))
    return chosen
