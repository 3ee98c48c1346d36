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

from gradwise.errors import UserInputError
from gradwise.memory.precision import autocast
from gradwise.train.batch import ACCEPTED, batch_loss, call_model, count_items, dataset_size, describe, to_device
from gradwise.train.evaluation import infer_task, metric_value, score_batch, split_metrics
from gradwise.train.pipeline import Pipeline
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
            with torch.no_grad():
                for metric in objects.values():
                    metric.reset()
                score_batch(model, batch, engine.loss_fn, task, engine.count_fn,
                            torch.zeros(5 + len(per_batch), dtype=torch.float64, device=engine.device),
                            per_batch, objects)
                for name, metric in objects.items():
                    metric_value(name, metric)
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
