"""L1 and L2 penalties added to the training loss (`regularize.l1`, `regularize.l2`).

Keras semantics: l2(c) adds c * sum(w ** 2) and l1(c) adds c * sum(|w|) over the
penalised tensors, so the L2 gradient is 2 c w. For plain SGD (no momentum) an L2
penalty c is therefore the same update as `optim.weight_decay=2c` (torch's
coupled decay adds wd * w to the gradient) and as decoupled decay of 2c per unit
lr (w <- w - lr * 2c * w). With momentum or an adaptive optimizer they differ:
the penalty's gradient is averaged and rescaled like any other, decoupled decay
(AdamW) is not (Loshchilov & Hutter 2019).

Which tensors are penalised follows `gradwise.optim.groups.is_excluded`, the
optimizer's own rule: by default biases and normalisation weights are not.
"""

from __future__ import annotations

import torch
from torch import nn

from gradwise.optim.groups import is_excluded
from gradwise.optim.layerwise import local


def penalised_params(model: nn.Module, exclude: list[str] | None = None) -> list[nn.Parameter]:
    """The trainable tensors the penalties apply to (those the optimizer would decay)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and not is_excluded(name, p, exclude)]


def penalty(params: list[torch.Tensor], l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """l1 * sum |w| + l2 * sum w^2 over `params`, as a scalar (fp32) that carries gradients.

    A sharded parameter (FSDP) contributes its local shard: the gradient lands on that shard directly
    (elementwise, so exact), and the shards' values add up to the whole penalty (`shard_sum`)."""
    total = torch.zeros((), device=local(params[0]).device if params else None)
    for p in params:
        w = local(p).float()
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.pow(2).sum()
    return total
