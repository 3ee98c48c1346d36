"""Optimizers and learning-rate schedules built from the config."""

from gradwise.optim.factory import build_optimizer
from gradwise.optim.schedules import LRMultiplier, build_scheduler, lr_multiplier

__all__ = ["build_optimizer", "build_scheduler", "lr_multiplier", "LRMultiplier"]
