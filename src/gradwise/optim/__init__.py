"""Optimizers (torch's SGD/Adam/AdamW, gradwise's LARS/LAMB), parameter groups and schedules."""

from gradwise.optim.factory import build_optimizer
from gradwise.optim.groups import param_groups
from gradwise.optim.lamb import LAMB
from gradwise.optim.lars import LARS
from gradwise.optim.schedules import LRMultiplier, build_scheduler, lr_multiplier, scaled_lr

__all__ = ["LAMB", "LARS", "build_optimizer", "build_scheduler", "lr_multiplier", "LRMultiplier",
           "param_groups", "scaled_lr"]
