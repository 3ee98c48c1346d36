"""Automatic parameter groups: which tensors get weight decay and layer-wise adaptation.

Default: tensors with one dimension or fewer (biases, normalisation weights and
scalars such as ReZero's alpha) are excluded from both. `exclude` patterns
(fnmatch on parameter names, e.g. "*.bias", "*ln*") replace that rule. Shared by
every optimizer and by the L1/L2 penalties.
"""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn


def is_excluded(name: str, param: nn.Parameter, exclude: list[str] | None) -> bool:
    if exclude is None:
        return param.ndim <= 1
    return any(fnmatch(name, pattern) for pattern in exclude)


def param_groups(model: nn.Module, weight_decay: float, exclude: list[str] | None = None) -> list[dict]:
    """[{decayed and adapted tensors}, {excluded tensors: weight_decay 0, adapt False}], empty groups dropped."""
    included, excluded = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (excluded if is_excluded(name, p, exclude) else included).append(p)
    groups = [
        {"params": included, "weight_decay": weight_decay, "adapt": True},
        {"params": excluded, "weight_decay": 0.0, "adapt": False},
    ]
    return [g for g in groups if g["params"]]
