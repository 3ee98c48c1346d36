"""`optim.name` -> an optimizer over automatic parameter groups (see `gradwise.optim.groups`)."""

from __future__ import annotations

import torch
from torch import nn

from gradwise.config import OptimConfig
from gradwise.optim.groups import param_groups
from gradwise.optim.lamb import LAMB
from gradwise.optim.lars import LARS


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, at learning rate `lr` (default `cfg.lr`).

    Weight decay and layer-wise adaptation apply to the first group only;
    biases and normalisation weights (or `cfg.exclude` patterns) go to the second.
    """
    return optimizer_for_groups(cfg, param_groups(model, cfg.weight_decay, cfg.exclude), lr)


def optimizer_for_groups(cfg: OptimConfig, groups: list[dict], lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer `cfg` names over parameter groups already made (`build_optimizer` makes them)."""
    lr = cfg.lr if lr is None else lr
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient,
                    trust_clip=cfg.trust_clip)
    if cfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, trust_clip=cfg.trust_clip)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    # torch's fused kernel: one pass over each tensor instead of torch's CPU default, a loop of ~10 ops per
    # tensor (3.2x faster steps on 3.4M parameters here: docs/benchmarks.md, `gradwise bench optimizers`)
    return cls(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=True)
