"""Evaluation: mean loss, and accuracy or bits-per-token where they are defined, over a dataset.

The loss is the mean over loss-bearing items (gradwise.train.batch.count_items:
samples for classification, tokens other than -100 for a language model).
Accuracy is reported only for a classification task whose every batch has
(B, C) logits and (B,) integer targets; otherwise it is left out, never 0.0.
Under data parallel every rank scores its contiguous share and the sums are
all-reduced. Metrics of the user's own: a function `fn(output, target)` is a
per-batch mean (averaged over loss-bearing items, right for a mean such as MAE);
an object with `update(preds, target)` / `compute()` / `reset()` (torchmetrics'
`Metric` as it is) sees every row and is computed once over the whole set, right
for F1, AUC, BLEU; under data parallel each rank scores its share and the
states are combined (torchmetrics' own all-gather, or `merge_state` for any
other object), so each row counts once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from gradwise.parallel.strategy import GradientSync
from gradwise.errors import ConfigError
from gradwise.train.batch import (batch_loss, call_model, count_items, dataset_size, describe, logits, target, tensors,
                                  to_device)
from gradwise.train.pipeline import BatchReader, Pipeline, batch_loader, loader_arguments
from gradwise.train.randomness import EVAL_DATA, derived_seed

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


def is_metric_object(metric: Any) -> bool:
    """A dataset-level metric (torchmetrics' `Metric`, or any object with `update`, `compute` and `reset`)."""
    return all(callable(getattr(metric, name, None)) for name in ("update", "compute", "reset"))


def split_metrics(metrics: dict[str, Any] | None) -> tuple[dict[str, Callable], dict[str, Any]]:
    """(per-batch functions, dataset-level metric objects) of a `metrics={name: ...}` argument."""
    metrics = metrics or {}
    objects = {name: m for name, m in metrics.items() if is_metric_object(m)}
    return {name: fn for name, fn in metrics.items() if name not in objects}, objects


def shares_evaluation(sync: GradientSync, data: dict[str, Pipeline | None]) -> bool:
    """Whether ranks split an evaluation set between them (unsharded data parallel, a sized set)."""
    return sync.shares_evaluation and any(
        pipeline is not None and not pipeline.streaming for role, pipeline in data.items() if role != "train")


def prepare_metrics(metrics: dict[str, Any] | None, sync: GradientSync, shared: bool) -> dict[str, Any]:
    """`metrics` checked (one line for what cannot work), their objects moved to the training device."""
    metrics = dict(metrics or {})
    for name, metric in metrics.items():
        if is_metric_object(metric):
            if shared and not syncs_itself(metric) and not callable(getattr(metric, "merge_state", None)):
                raise ConfigError(f"config error: metrics[{name!r}] ({type(metric).__name__}) has no merge_state("
                                  f"other): under data parallel ({sync.world_size} processes) each scores its share "
                                  "of the evaluation set and the states are merged; add merge_state, or use a "
                                  "torchmetrics Metric")
            if isinstance(metric, nn.Module):
                metric.to(sync.device)
        elif not callable(metric):
            raise ConfigError(f"config error: metrics[{name!r}] is a {type(metric).__name__}; pass a function "
                              "fn(output, target) (a per-batch mean) or an object with update(preds, target), "
                              "compute() and reset() (over the whole set: torchmetrics' Metric)")
    return metrics


def prediction(output: Any) -> Any:
    """What a metric object's `update(preds, target)` receives from an output: its logits (or itself)."""
    pred = logits(output)
    return pred if isinstance(pred, torch.Tensor) else output


def _single_process() -> bool:
    return False


def syncs_itself(metric: Any) -> bool:
    """A torchmetrics Metric: it all-gathers its own states across processes when it computes."""
    return callable(getattr(metric, "sync", None)) and hasattr(metric, "distributed_available_fn")


def metric_value(name: str, metric: Any, shared: bool = False, sync: GradientSync | None = None) -> float:
    """`metric.compute()` over every evaluated row, as one number. When ranks `shared` the evaluation, a
    torchmetrics Metric gathers their states itself (every rank computes together); any other object has
    every other rank's state merged into its own (`merge_state`). Otherwise this process saw every row, and
    torchmetrics' own gathering is turned off for the call (it would count each row once per process)."""
    if shared and not syncs_itself(metric):
        for rank, other in enumerate(sync.rank_states(metric)):
            if rank != sync.rank:
                metric.merge_state(other)
    own = getattr(metric, "distributed_available_fn", None) if syncs_itself(metric) and not shared else None
    if own is not None:
        metric.distributed_available_fn = _single_process
    try:
        value = metric.compute()
    finally:
        if own is not None:
            metric.distributed_available_fn = own
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"metrics[{name!r}].compute() returned {describe(value)}; a metric must give one number")


def score_batch(model: nn.Module, batch: Any, loss_fn: Callable, task: str, count_fn: Callable | None,
                sums: torch.Tensor, metrics: dict[str, Callable] | None = None,
                objects: dict[str, Any] | None = None) -> None:
    """Add one batch's loss sum, items, hits and scored samples (or one unscored batch), then each per-batch
    metric's sum, to `sums`; update each metric object with the batch's predictions and target."""
    output = call_model(model, batch)
    items = count_items(batch, count_fn).to(sums.device, torch.float64)
    sums[0] += batch_loss(output, batch, loss_fn).double() * items
    sums[1] += items
    seen = batch if isinstance(batch, Mapping) else target(batch)
    for i, fn in enumerate((metrics or {}).values()):
        sums[5 + i] += torch.as_tensor(fn(output, seen), dtype=torch.float64, device=sums.device) * items
    for metric in (objects or {}).values():
        metric.update(prediction(output), target(batch))
    hits = correct_predictions(output, batch) if task == "classification" else None
    if hits is None:
        sums[4] += 1
    else:
        sums[2] += hits[0]
        sums[3] += hits[1]


def eval_batches(data: Pipeline, batch_size: int, sync: GradientSync, seed: int) -> tuple[Iterable[Any], bool]:
    """(batches, whether ranks share the work): this rank's contiguous share of a sized dataset, or the
    whole of a streaming one (scored on every rank, not reduced). Batches are read and collated as in
    training (gradwise.train.pipeline), with the evaluation set's loader workers if it came with any (kept
    between evaluations when they persist)."""
    settings = data.settings()
    seed = derived_seed(seed, EVAL_DATA)
    if data.streaming:
        loader = data.evaluation_loader or DataLoader(data.dataset, batch_size=batch_size, collate_fn=data.collate_fn,
                                                      **loader_arguments(settings, seed))
    else:
        part = sync.evaluation_rows(len(data.dataset))  # FSDP: the whole set (every forward is a collective)
        requests = [((start,), list(range(start, min(part.stop, start + batch_size))))
                    for start in range(part.start, part.stop, batch_size)]
        reader = BatchReader(data.dataset, data.collate_fn, seed)
        if not settings.get("num_workers"):
            return (reader.read(*request) for request in requests), sync.shares_evaluation
        loader = data.evaluation_loader or batch_loader(reader, requests, settings, seed)
    if settings.get("persistent_workers"):
        data.evaluation_loader = loader
    return loader, sync.shares_evaluation and not data.streaming


@torch.no_grad()
def evaluate(model: nn.Module, data: Pipeline | None, loss_fn: Callable, *, task: str, sync: GradientSync,
             batch_size: int, seed: int, prefix: str = "test", count_fn: Callable | None = None,
             metrics: dict[str, Any] | None = None) -> dict[str, float]:
    """`{prefix}_loss`, plus `{prefix}_accuracy` (classification) or `{prefix}_bpc` (language model: bits per
    token, per character for the built-in character model), and `{prefix}_NAME` for each metric. The model is
    left in the mode it was in. Per-batch metric functions are averaged over loss-bearing items; metric
    objects are reset, updated with every batch and computed over the whole set."""
    if data is None or dataset_size(data.dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    per_batch, objects = split_metrics(metrics)
    for metric in objects.values():
        metric.reset()
    sums = torch.zeros(5 + len(per_batch), dtype=torch.float64, device=sync.device)  # loss sum, items, hits,
    batches, shared = eval_batches(data, batch_size, sync, seed)                      # scored, unscored, metrics
    for batch in batches:
        score_batch(model, to_device(batch, sync.device), loss_fn, task, count_fn, sums, per_batch, objects)
    model.train(was_training)
    loss_sum, items, correct, scored, unscored, *extra = (sync.all_reduce_sum(sums) if shared else sums).tolist()
    result = {f"{prefix}_loss": loss_sum / max(items, 1.0)}
    result.update({f"{prefix}_{name}": value / max(items, 1.0) for name, value in zip(per_batch, extra)})
    for name, metric in objects.items():
        result[f"{prefix}_{name}"] = metric_value(name, metric, shared, sync)
    if task == "language_model":
        result[f"{prefix}_bpc"] = result[f"{prefix}_loss"] / math.log(2)
    elif task == "classification" and unscored == 0 and scored > 0:
        result[f"{prefix}_accuracy"] = correct / scored
    return result
