"""Settle the config once, before any trainer exists.

`resolve_config` turns a validated config into the one a run trains with:
the planner's choice for `memory.auto=true` (written in, with `memory.auto`
switched off), the schedule horizon (`schedule.total_steps`, fixed for the
life of the run), and warmup given in epochs (`schedule.warmup_epochs`,
turned into `schedule.warmup_steps`). The scaled learning rate
(`schedule.scale_rule`) is a pure function of the resolved config
(`StepEngine.lr`). The result is frozen: setting a key raises TypeError (edit
`cfg.thawed()` instead). Resolving a resolved config changes nothing, so rank 0's
resolution broadcast to every rank, or the async driver's handed to the
server and every worker, is what they all train with.
"""

from __future__ import annotations

from typing import Callable

from gradwise.config import Config
from gradwise.errors import ConfigError
from gradwise.data.sampler import batches_per_epoch


# What the planner sets for memory.auto=true (gradwise.tools.planner.apply_choice), memory.auto itself included
PLANNED_KEYS = ("train.accumulate", "train.micro_batch_size", "memory.checkpoint", "memory.modules", "precision",
                "memory.auto")


def run_length(cfg: Config, train_size: int | None) -> tuple[int | None, int]:
    """(batches per epoch, steps the run takes): `train.steps`, or `train.epochs` passes.

    `train_size` None (an IterableDataset: no length) needs `train.steps`; batches per epoch are then unknown.
    """
    tc = cfg.train
    if train_size is None:
        if tc.steps is None:
            raise ConfigError(f"config error: train.epochs={tc.epochs} needs a dataset with a length; a streaming "
                              "(iterable) dataset has none: set train.steps=N")
        return None, tc.steps
    if tc.drop_last and tc.batch_size > train_size:
        raise ConfigError(f"config error: train.batch_size={tc.batch_size} exceeds the {train_size} training samples "
                          f"with train.drop_last=true; use a batch of at most {train_size}")
    per_epoch = batches_per_epoch(train_size, tc.batch_size, tc.drop_last)
    return per_epoch, tc.steps if tc.steps is not None else tc.epochs * per_epoch


def resolve_config(cfg: Config, train_size: int | None, *, gradients_per_update: int = 1,
                   planner: Callable[[Config], Config] | None = None) -> Config:
    """A resolved, frozen copy of `cfg` for a training set of `train_size` samples.

    `planner(cfg) -> cfg` settles `memory.auto=true` (gradwise.tools.planner.plan_config plans on the
    built-in model and data; a Trainer of your own model plans on it first: gradwise.train.planning).
    `gradients_per_update` > 1 (synchronous parameter server: M gradients per update) shortens the schedule's
    horizon to the number of updates.
    """
    cfg = cfg.thawed()
    if cfg.memory.auto:
        if planner is None:
            raise ConfigError(
                "config error: memory.auto=true needs a planner (gradwise.tools.planner.plan_config: `import "
                "gradwise` hands it to the Trainer), or set train.accumulate, memory.checkpoint and precision "
                "yourself"
            )
        cfg = planner(cfg)
    per_epoch, total = run_length(cfg, train_size)
    sc = cfg.schedule
    if sc.total_steps is None:
        sc.total_steps = max(1, total // gradients_per_update)
    if sc.warmup_epochs is not None:
        if per_epoch is None:
            raise ConfigError(f"config error: schedule.warmup_epochs={sc.warmup_epochs} needs a dataset with a "
                              "length; for a streaming dataset set schedule.warmup_steps")
        sc.warmup_epochs, sc.warmup_steps = None, round(sc.warmup_epochs * per_epoch)
    return cfg.frozen()
