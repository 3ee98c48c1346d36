"""Learning-rate schedules as pure multipliers of the base lr, wrapped in `LambdaLR`.

`lr_multiplier(step, ...)` is the math; `LRMultiplier` makes it a picklable
callable so a scheduler rebuilt from the config resumes exactly. `scaled_lr`
applies the batch-size scaling rules of Goyal et al. 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradwise.config import ScheduleConfig


def lr_multiplier(step: int, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                  power: float = 2.0, step_every: int | None = None, gamma: float = 0.1) -> float:
    """Multiplier for the update with index `step` (0-based).

    Warmup: (step+1)/warmup_steps for step < warmup_steps. After it, with
    progress p = (step - warmup) / (total - warmup) capped at 1:
    constant 1; cosine min + (1-min)(1+cos(pi p))/2; poly min + (1-min)(1-p)^power;
    step gamma ** floor((step - warmup) / step_every).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "step":
        return gamma ** ((step - warmup_steps) // step_every)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "poly":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress) ** power
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(lr: float, batch_size: int, base_batch: int, rule: str) -> float:
    """optim.lr scaled to the global batch: none, linear (B/base) or sqrt (sqrt(B/base))."""
    if rule == "linear":
        return lr * batch_size / base_batch
    if rule == "sqrt":
        return lr * math.sqrt(batch_size / base_batch)
    return lr


@dataclass(frozen=True)
class LRMultiplier:
    name: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    power: float = 2.0
    step_every: int | None = None
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.name, self.warmup_steps, self.total_steps, self.min_lr_ratio,
                             self.power, self.step_every, self.gamma)


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler over `total_steps` updates (cfg.total_steps overrides the run length).

    `cfg.warmup_epochs` must already be resolved into `cfg.warmup_steps` (gradwise.resolve does this).
    """
    fn = LRMultiplier(cfg.name, cfg.warmup_steps, cfg.total_steps or total_steps, cfg.min_lr_ratio,
                      cfg.power, cfg.step_every, cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
