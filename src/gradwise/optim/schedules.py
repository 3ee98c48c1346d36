"""Learning-rate schedules as pure multipliers of the base lr, wrapped in `LambdaLR`.

`lr_multiplier(step, ...)` is the math; `LRMultiplier` makes it a picklable
callable so a scheduler rebuilt from the config resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradwise.config import ScheduleConfig


def lr_multiplier(step: int, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier for the update with index `step` (0-based).

    Warmup: (step+1)/warmup_steps for step < warmup_steps. Then `constant` gives 1;
    `cosine` decays from 1 to min_lr_ratio over the remaining steps up to
    total_steps and stays at min_lr_ratio after it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRMultiplier:
    name: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.name, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler over `total_steps` updates (cfg.total_steps overrides the run length)."""
    fn = LRMultiplier(cfg.name, cfg.warmup_steps, cfg.total_steps or total_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
