"""The first-batch check: a bad model / batch / loss combination fails in one line before any training time.

Before a run starts, the trainer runs its model on the first two samples of the
training set (forward, loss, backward, in eval mode with the RNG restored
afterwards, so the run itself is unchanged) and on the first two of the
evaluation set, through the same code the run uses. Whatever fails there is a
`BatchError` (exit status 2) naming what was received and what is accepted,
raised before the run directory is written.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from gradwise.errors import UserInputError
from gradwise.memory.precision import autocast
from gradwise.train.batch import ACCEPTED, batch_loss, call_model, dataset_size, describe, first_rows, to_device
from gradwise.train.evaluation import infer_task, score_batch
from gradwise.train.state import capture_rng, restore_rng


class BatchError(UserInputError):
    """The model, the batch and the loss do not fit together."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def check_first_batch(engine, train_data: Dataset, eval_data: Dataset | None, task: str | None,
                      trains: bool = True, metrics: dict | None = None) -> str:
    """Run the checks; return the task (inferred from the first batch's output when `task` is None)."""
    model, rng, was_training = engine.model, capture_rng(), engine.model.training
    batch: Any = None
    stage = "reading the first sample"
    model.eval()
    try:
        batch = to_device(first_rows(train_data, 2), engine.device)
        stage = "the model's forward"
        with autocast(engine.cfg.precision, engine.device), torch.set_grad_enabled(trains):
            output = call_model(model, batch)
            stage = "the loss"
            loss = batch_loss(output, batch, engine.loss_fn)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"the loss must be a one-element tensor, got {describe(loss)}")
        if trains:
            stage = "backward through the loss"
            loss.float().backward()
        task = task or infer_task(output, batch)
        if eval_data is not None and dataset_size(eval_data) != 0:
            stage, batch = "evaluation", to_device(first_rows(eval_data, 2), engine.device)
            with torch.no_grad():
                score_batch(model, batch, engine.loss_fn, task, engine.count_fn,
                            torch.zeros(5 + len(metrics or {}), dtype=torch.float64, device=engine.device), metrics)
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here is a bad combination, reported in one line
        raise BatchError(f"batch error: {stage} failed on the first batch, {describe(batch)}: {_first_line(err)}; "
                         f"accepted: {ACCEPTED}; the loss comes from output.loss or loss_fn(output, target)") from None
    finally:
        engine.optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
        restore_rng(rng)
    return task
