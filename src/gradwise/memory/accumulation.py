"""Exact gradient accumulation: split a batch into micro-batches and weight each
micro-batch's mean loss by its share of the batch's loss-bearing items.

With counts c_i and C = sum c_i, sum_i (c_i / C) * mean_loss_i equals the mean
loss over the whole batch, however unevenly the items fall (padding tokens in a
language model, a short last batch of an epoch).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets with this value carry no loss (torch's cross-entropy default)


def item_count(targets: torch.Tensor) -> torch.Tensor:
    """Loss-bearing items in `targets`: integer targets other than IGNORE_INDEX, else every element."""
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return (targets != IGNORE_INDEX).sum()
    return torch.tensor(targets.numel(), device=targets.device)


def micro_batch_slices(batch: int, micro_batches: int, micro_batch_size: int | None = None) -> list[slice]:
    """Cut `batch` rows into consecutive slices: of `micro_batch_size` rows if given, else
    `micro_batches` near-equal parts (sizes differ by at most one; empty parts dropped)."""
    if micro_batch_size is not None:
        return [slice(s, min(s + micro_batch_size, batch)) for s in range(0, batch, micro_batch_size)]
    base, extra = divmod(batch, micro_batches)
    slices, start = [], 0
    for i in range(micro_batches):
        size = base + (1 if i < extra else 0)
        if size:
            slices.append(slice(start, start + size))
        start += size
    return slices


def loss_weights(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """c_i / C for each micro-batch (0 where the whole batch has no loss-bearing item)."""
    total = torch.stack(counts).sum().clamp(min=1).to(torch.float32)
    return [c.to(torch.float32) / total for c in counts]
