"""Batches: gather rows of a dataset and move them to the device.

Today a batch is an `(inputs, targets)` pair of tensors; this module is the one
place that knows it (issue: any batch structure).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate


def fetch_batch(dataset: Dataset, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather samples `idx`: one indexing op per tensor for a TensorDataset, else collate item by item."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    return tuple(default_collate([dataset[i] for i in idx.tolist()]))


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in batch)
