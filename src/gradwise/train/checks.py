"""The first-batch check: a bad model / batch / loss combination fails in one line before any training time.

Before a run starts, the trainer runs its model on the first two samples of the
training set (forward, loss, backward, in eval mode with the RNG restored
afterwards, so the run itself is unchanged) and on the first two of each
evaluation set (validation and test, with every metric), through the same code
the run uses, collate function included. Whatever fails there is a
`BatchError` (exit status 2) naming what was received and what is accepted,
raised before the run directory is written.
"""

from __future__ import annotations

from typing import Any

import torch

from gradwise.arguments import a_name
from gradwise.errors import ArgumentValueError, UserInputError
from gradwise.memory.precision import autocast
from gradwise.train.batch import (ACCEPTED, batch_loss, call_model, count_items, dataset_size, describe, tensors,
                                  to_device)
from gradwise.train.evaluation import infer_task, metric_value, score_batch, split_metrics
from gradwise.train.pipeline import Pipeline, as_pipeline
from gradwise.train.randomness import capture_rng, restore_rng


class BatchError(UserInputError, ValueError):
    """The model, the batch and the loss do not fit together."""


def error_line(err: BaseException) -> str:
    """One line for an exception: its type and first line (a loader worker's: the worker and the last line)."""
    text = str(err).strip().splitlines()
    if text and text[0].startswith("Caught ") and "DataLoader worker" in text[0]:  # re-raised from a worker
        return f"{text[0].removeprefix('Caught ').rstrip('.')}: {text[-1].strip()[:200]}"
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def check_first_batch(engine, data: dict[str, Pipeline | None], task: str | None, trains: bool = True,
                      metrics: dict | None = None) -> str:
    """Run the checks on `data["train"]` and each evaluation set in `data`; return the task (inferred from the
    first batch's output when `task` is None)."""
    model, rng, was_training = engine.model, capture_rng(), engine.model.training
    per_batch, objects = split_metrics(metrics)
    batch: Any = None
    stage = "reading the first sample"
    model.eval()
    try:
        train = data["train"]
        batch = to_device(train.first_batch(), engine.device)
        if any(t.is_floating_point() and t.isnan().any() for t in tensors(batch)):  # (inf: an additive mask's)
            raise ValueError("it holds nan values (training would stop at its first step)")
        stage = "the model's forward"
        with autocast(engine.cfg.precision, engine.device), torch.set_grad_enabled(trains):
            output = call_model(model, batch)
            stage = "the loss"
            loss = batch_loss(output, batch, engine.loss_fn)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"the loss must be a one-element tensor, got {describe(loss)}")
        stage = "count_fn"
        count_items(batch, engine.count_fn)
        if trains:
            stage = "backward through the loss"
            loss.float().backward()
        task = task or infer_task(output, batch)
        for role in ("val", "test"):
            pipe = data.get(role)
            if pipe is None or dataset_size(pipe.dataset) == 0:
                continue
            stage, batch = f"evaluation ({role})", None
            batch = to_device(pipe.first_batch(), engine.device)
            _score_first(engine, batch, task, per_batch, objects)
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here is a bad combination, reported in one line
        raise BatchError(f"batch error: {stage} failed on the first batch, {describe(batch)}: {error_line(err)}; "
                         f"accepted: {ACCEPTED}; the loss comes from output.loss or loss_fn(output, target)") from None
    finally:
        for metric in objects.values():
            metric.reset()
        engine.optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
        restore_rng(rng)
    return task


def _score_first(engine, batch: Any, task: str, per_batch: dict, objects: dict) -> None:
    with torch.no_grad():
        for metric in objects.values():
            metric.reset()
        score_batch(engine.model, batch, engine.loss_fn, task, engine.count_fn,
                    torch.zeros(5 + len(per_batch), dtype=torch.float64, device=engine.device), per_batch, objects)
        for name, metric in objects.items():
            metric_value(name, metric)


def checked_evaluation(trainer, data: Any, prefix: Any) -> Pipeline | None:
    """`Trainer.evaluate(data, prefix)`'s arguments: the prefix a name, and `data` a pipeline whose first batch
    scores (model, loss, metrics) in one line of error otherwise, as the first-batch check does for every set."""
    if not a_name(prefix):
        raise ArgumentValueError(f"argument error: prefix={prefix!r}; allowed: a name without spaces that starts "
                                 "the result's keys, e.g. 'test'")
    if isinstance(data, Pipeline):  # one of the trainer's own sets, checked when it was built
        return data
    pipeline = as_pipeline(data, "data", trainer.collate_fn)
    if pipeline is None or dataset_size(pipeline.dataset) == 0:
        return pipeline
    engine, was_training, rng = trainer.engine, trainer.engine.model.training, capture_rng()
    per_batch, objects = split_metrics(trainer.metrics)
    batch: Any = None
    try:
        batch = to_device(pipeline.first_batch(), engine.device)
        engine.model.eval()
        _score_first(engine, batch, trainer.task, per_batch, objects)
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - as the first-batch check: one line naming what was received
        raise BatchError(f"batch error: evaluating data failed on its first batch, {describe(batch)}: "
                         f"{error_line(err)}; accepted: {ACCEPTED}") from None
    finally:
        for metric in objects.values():
            metric.reset()
        engine.model.train(was_training)
        restore_rng(rng)  # evaluation never moves the training streams
    return pipeline
