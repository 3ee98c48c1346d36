"""Evaluation: mean loss, and accuracy or bits-per-token where they are defined, over a dataset.

The loss is the mean over loss-bearing items (gradwise.train.batch.count_items:
samples for classification, tokens other than -100 for a language model).
Accuracy is reported only for a classification task whose every batch has
(B, C) logits and (B,) integer targets; otherwise it is left out, never 0.0.
Under data parallel every rank scores its contiguous share and the sums are
all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from gradwise.distributed.sync import GradientSync
from gradwise.train.batch import (batch_loss, call_model, count_items, dataset_size, fetch_batch, logits, target,
                                  tensors, to_device)

INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def infer_task(output: Any, batch: Any) -> str:
    """"classification" for (B, C) logits and (B,) integer targets, "language_model" for (B, T, V) and (B, T),
    else "other" (the loss alone is reported)."""
    pred, found = logits(output), tensors(target(batch))
    if not isinstance(pred, torch.Tensor) or not found or found[0].dtype not in INTEGER:
        return "other"
    if pred.ndim == 2 and found[0].ndim == 1:
        return "classification"
    if pred.ndim == 3 and found[0].ndim == 2:
        return "language_model"
    return "other"


def correct_predictions(output: Any, batch: Any) -> tuple[torch.Tensor, int] | None:
    """(argmax hits, samples) for (B, C) logits and (B,) integer targets; None where accuracy is not defined."""
    pred, found = logits(output), tensors(target(batch))
    if not isinstance(pred, torch.Tensor) or not found:
        return None
    y = found[0]
    if pred.ndim != 2 or y.ndim != 1 or y.dtype not in INTEGER or len(y) != len(pred):
        return None
    return (pred.argmax(dim=-1) == y).sum(), len(y)


def score_batch(model: nn.Module, batch: Any, loss_fn: Callable, task: str, count_fn: Callable | None,
                sums: torch.Tensor, metrics: dict[str, Callable] | None = None) -> None:
    """Add one batch's loss sum, items, hits and scored samples (or one unscored batch), then each metric's
    sum, to `sums`."""
    output = call_model(model, batch)
    items = count_items(batch, count_fn).to(sums.device, torch.float64)
    sums[0] += batch_loss(output, batch, loss_fn).double() * items
    sums[1] += items
    seen = batch if isinstance(batch, Mapping) else target(batch)
    for i, fn in enumerate((metrics or {}).values()):
        sums[5 + i] += torch.as_tensor(fn(output, seen), dtype=torch.float64, device=sums.device) * items
    hits = correct_predictions(output, batch) if task == "classification" else None
    if hits is None:
        sums[4] += 1
    else:
        sums[2] += hits[0]
        sums[3] += hits[1]


def eval_batches(dataset: Dataset, batch_size: int, sync: GradientSync) -> tuple[Iterator[Any], bool]:
    """(batches, whether ranks share the work): this rank's contiguous share of a sized dataset, or the
    whole of a streaming one (scored on every rank, not reduced)."""
    if isinstance(dataset, IterableDataset):
        # a generator of its own: a DataLoader otherwise draws its base seed from the training RNG
        return iter(DataLoader(dataset, batch_size=batch_size, generator=torch.Generator().manual_seed(0))), False
    # sharded parameters (FSDP): every forward is a collective, so every rank scores the whole set
    part = slice(0, len(dataset)) if sync.sharded else sync.shard(len(dataset))
    return (fetch_batch(dataset, torch.arange(start, min(part.stop, start + batch_size)))
            for start in range(part.start, part.stop, batch_size)), not sync.sharded


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset | None, loss_fn: Callable, *, task: str, sync: GradientSync,
             batch_size: int, prefix: str = "test", count_fn: Callable | None = None,
             metrics: dict[str, Callable] | None = None) -> dict[str, float]:
    """`{prefix}_loss`, plus `{prefix}_accuracy` (classification) or `{prefix}_bpc` (language model: bits per
    token, per character for the built-in character model). The model is left in the mode it was in."""
    if dataset is None or dataset_size(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    metrics = metrics or {}
    sums = torch.zeros(5 + len(metrics), dtype=torch.float64, device=sync.device)  # loss sum, items, hits,
    batches, shared = eval_batches(dataset, batch_size, sync)                       # scored, unscored, metrics
    for batch in batches:
        score_batch(model, to_device(batch, sync.device), loss_fn, task, count_fn, sums, metrics)
    model.train(was_training)
    loss_sum, items, correct, scored, unscored, *extra = (sync.all_reduce_sum(sums) if shared else sums).tolist()
    result = {f"{prefix}_loss": loss_sum / max(items, 1.0)}
    result.update({f"{prefix}_{name}": value / max(items, 1.0) for name, value in zip(metrics, extra)})
    if task == "language_model":
        result[f"{prefix}_bpc"] = result[f"{prefix}_loss"] / math.log(2)
    elif task == "classification" and unscored == 0 and scored > 0:
        result[f"{prefix}_accuracy"] = correct / scored
    return result
