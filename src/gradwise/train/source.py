"""Where a step's gradients come from. `BatchSteps`: the next batch of the training set, through the step engine.

A source has `next_step(trainer) -> StepOutput`, `record_fields()` (extra
fields for every train and eval record), `window_metrics()` (for train records:
figures over the steps since the last one) and `computes_gradients` (False for the
parameter server, whose gradients arrive from workers: gradwise.distributed.ps_server).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import TensorDataset

from gradwise.train.batch import fetch_batch, to_device
from gradwise.train.callbacks.base import StepOutput
from gradwise.train.sampler import EpochBatches


class BatchSteps:
    """Each step trains on the next batch in the seeded order (gradwise.train.sampler), resumable by position.

    Under data parallel every rank draws the same global batch and keeps its strategy's shard of it.
    """

    computes_gradients = True

    def __init__(self):
        self.batches: EpochBatches | None = None

    def next_step(self, trainer) -> StepOutput:
        cfg, state, sync, engine = trainer.cfg, trainer.state, trainer.sync, trainer.engine
        if self.batches is None or self.batches.position is not state.position:  # a new run, a resume or a rollback
            self.batches = EpochBatches(len(trainer.train_data), cfg.train.batch_size, cfg.seed, cfg.train.drop_last,
                                        state.position)
        idx = self.batches.next()
        global_count = None
        if sync.needs_global_count and isinstance(trainer.train_data, TensorDataset):  # no collective needed
            global_count = engine.count_fn(trainer.train_data.tensors[-1][idx]).to(engine.device)
        batch = to_device(fetch_batch(trainer.train_data, sync.local_rows(idx)), engine.device)
        lr = engine.optimizer.param_groups[0]["lr"]  # the rate this update uses
        loss = engine.train_step(batch, global_count)
        return StepOutput(loss, len(idx), lr)

    def record_fields(self) -> dict[str, Any]:
        return {}

    def window_metrics(self) -> dict[str, Any]:
        return {}
