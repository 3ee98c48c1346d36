"""A model's buffers under the parameter server: what a worker's forward did to them, folded into the server's.

A worker pulls the server's whole state (parameters and buffers), and its training forward moves the buffers
(BatchNorm's running statistics, its batch count). The push carries, per buffer that moved, (scale, old,
new): the server's buffer b becomes scale * b + (new - scale * old), and simply `new` while b is still `old`
(no other push moved it since this worker's pull: one worker gives the sequential run's buffers, bit for bit).
For a BatchNorm running statistic with momentum m, an exponential average of batch statistics, the worker's
update was new = (1 - m) * old + m * batch, so scale = 1 - m folds that batch's statistic into the server's
average as a single process would have ((1 - m) ** k after k forwards: accumulation, recomputation); a
counter adds what the forward added (scale 1); a flag (bool, uint8) takes the latest value. The
server's buffers are its model's, so checkpoints, resume, evaluation and `gradwise export` carry them.
"""

from __future__ import annotations

import torch
from torch import nn

Contribution = tuple[float, torch.Tensor, torch.Tensor]  # (scale, old, new)


def snapshot_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer's value now (a worker's, right after its pull)."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _averaged(model: nn.Module) -> dict[str, tuple[float, str]]:
    """{buffer name: (momentum, its layer's batch counter)} for the running statistics of BatchNorm layers that
    keep an exponential average."""
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            where = f"{prefix}." if prefix else ""
            for stat in ("running_mean", "running_var"):
                found[where + stat] = (float(module.momentum), where + "num_batches_tracked")
    return found


def buffer_contributions(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, Contribution]:
    """What a forward did to each buffer since `before`, as (scale, old, new) on the CPU (see the module
    docstring); buffers it left alone are left out."""
    averaged = _averaged(model)
    buffers = dict(model.named_buffers())
    out: dict[str, Contribution] = {}
    for name, buf in buffers.items():
        old = before.get(name)
        if old is None or torch.equal(buf, old):
            continue
        scale = 1.0
        if name in averaged:  # k forwards (accumulation, recomputation) averaged k batches in: (1 - m) ** k
            m, counter = averaged[name]
            k = int(buffers[counter] - before[counter]) if counter in buffers and counter in before else 1
            scale = (1.0 - m) ** max(k, 1)
        out[name] = (scale, old.cpu(), buf.detach().clone().cpu())
    return out


@torch.no_grad()
def fold_buffers(model: nn.Module, contributions: dict[str, Contribution]) -> None:
    """Apply a worker's contributions to `model`'s buffers (the server's)."""
    buffers = dict(model.named_buffers())
    for name, (scale, old, new) in contributions.items():
        buf = buffers[name]
        old, new = old.to(buf.device), new.to(buf.device)
        if buf.shape != new.shape:
            continue  # a buffer that changed shape (a cache): the server keeps its own
        if torch.equal(buf, old) or buf.dtype in (torch.bool, torch.uint8):  # no push since the pull; a flag
            buf.copy_(new)
        elif scale == 1.0:
            buf.add_(new - old)
        else:
            buf.copy_((scale * buf.float() + (new.float() - scale * old.float())).to(buf.dtype))
