"""Evaluation: mean loss, and accuracy or bits-per-char, over a dataset (each rank scores its share)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from gradwise.distributed.sync import GradientSync
from gradwise.train.batch import fetch_batch, to_device


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset | None, loss_fn: Callable, *, task: str, sync: GradientSync,
             batch_size: int, prefix: str = "test") -> dict[str, float]:
    """`{prefix}_loss`, plus `{prefix}_accuracy` (classification) or `{prefix}_bpc` (language model).

    Accuracy counts argmax hits for (B, C) outputs and (B,) targets; with data parallel every rank scores
    its contiguous share and the sums are all-reduced. The model is left in the mode it was in.
    """
    if dataset is None or len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    device = sync.device
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    n = len(dataset)
    part = sync.shard(n)
    classify = task == "classification"
    for start in range(part.start, part.stop, batch_size):
        inputs, targets = to_device(fetch_batch(dataset, torch.arange(start, min(part.stop, start + batch_size))),
                                    device)
        outputs = model(inputs)
        total_loss += loss_fn(outputs, targets) * len(targets)
        if classify and outputs.ndim == 2 and targets.ndim == 1:
            correct += (outputs.argmax(dim=-1) == targets).sum()
    model.train(was_training)
    total_loss, correct = sync.all_reduce_sum(torch.stack([total_loss, correct]))
    result = {f"{prefix}_loss": float(total_loss) / n}
    if task == "language_model":
        result[f"{prefix}_bpc"] = result[f"{prefix}_loss"] / math.log(2)
    elif classify:
        result[f"{prefix}_accuracy"] = float(correct) / n
    return result
