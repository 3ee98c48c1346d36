"""Where a step's gradients come from. `BatchSteps`: the next batch of the training set, through the step engine.

A source has `next_step(trainer) -> StepOutput`, `record_fields()` (extra
fields for every train and eval record), `window_metrics()` (for train records:
figures over the steps since the last one), `computes_gradients` (False for the
parameter server, whose gradients arrive from workers: gradwise.distributed.ps_server)
and `lr_factor(cfg)` (the asynchronous sources' `ps.lr_scale`; 1 otherwise).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from gradwise.train.batch import fetch_batch, rows, split, to_device
from gradwise.train.callbacks.base import Callback, StepOutput
from gradwise.train.sampler import EpochBatches, Position


class _AheadBatches:
    """The batch sampler a DataLoader reads: this rank's rows of the next `count` batches from a position
    (as many as the fit has steps left, so the workers never prepare a batch nobody will use)."""

    def __init__(self, batches: EpochBatches, sync, count: int):
        self.batches, self.sync, self.count = batches, sync, count

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.count):
            yield self.sync.local_rows(self.batches.next()).tolist()


class StepSource(Callback):
    """The defaults every source shares; `close()` drops what it holds (loader workers) when a fit ends."""

    computes_gradients = True

    def lr_factor(self, cfg) -> float:
        """What the step engine multiplies the scaled optim.lr by (an asynchronous source's staleness policy)."""
        return 1.0

    def record_fields(self) -> dict[str, Any]:
        return {}

    def window_metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None: ...

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        self.close()

    def on_exception(self, trainer, error: BaseException) -> None:
        self.close()


class BatchSteps(StepSource):
    """Each step trains on the next batch in the seeded order (gradwise.train.sampler), resumable by position.

    Under data parallel every rank draws the same global batch and keeps its strategy's shard of it. With
    `loader.num_workers` > 0, torch's DataLoader prepares the batches in worker processes from a sampler
    that follows the same order, so the batches, and a resume mid-epoch, do not depend on the workers.
    """

    def __init__(self):
        self.batches: EpochBatches | None = None
        self.loader: Iterator[Any] | None = None

    def next_step(self, trainer) -> StepOutput:
        cfg, state, sync, engine = trainer.cfg, trainer.state, trainer.sync, trainer.engine
        if self.batches is None or self.batches.position is not state.position:  # a new run, a resume or a rollback
            self.batches = EpochBatches(len(trainer.train_data), cfg.train.batch_size, cfg.seed, cfg.train.drop_last,
                                        state.position)
            self.loader = self._loader(trainer) if cfg.loader.num_workers else None
        idx = self.batches.next()
        global_count = None
        if sync.needs_global_count and isinstance(trainer.train_data, TensorDataset):  # no collective needed
            global_count = engine.count_fn(trainer.train_data.tensors[-1][idx]).to(engine.device)
        batch = next(self.loader) if self.loader is not None else fetch_batch(trainer.train_data, sync.local_rows(idx))
        lr = engine.optimizer.param_groups[0]["lr"]  # the rate this update uses
        loss = self.train_step(engine, to_device(batch, engine.device), global_count)
        return StepOutput(loss, len(idx), lr)

    def train_step(self, engine, batch: Any, global_count: torch.Tensor | None) -> torch.Tensor:
        """One update from `batch` (the delay simulator computes its gradient on older weights)."""
        return engine.train_step(batch, global_count)

    def on_checkpoint_load(self, trainer, payload: dict[str, Any]) -> None:
        delay = payload.get("delay")
        if delay is not None:
            from gradwise.errors import ConfigError

            raise ConfigError(f"config error: this run was trained with --strategy simulate --workers "
                              f"{delay.get('workers')}; resume it with those flags")

    def _loader(self, trainer) -> Iterator[Any]:
        cfg, pos = trainer.cfg, trainer.state.position
        ahead = EpochBatches(len(trainer.train_data), cfg.train.batch_size, cfg.seed, cfg.train.drop_last,
                             Position(pos.epoch, pos.batch))
        lc = cfg.loader
        sampler = _AheadBatches(ahead, trainer.sync, trainer.state.end - trainer.state.step)
        loader = DataLoader(trainer.train_data, batch_sampler=sampler,
                            num_workers=lc.num_workers, pin_memory=lc.pin_memory, prefetch_factor=lc.prefetch_factor,
                            persistent_workers=lc.persistent_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG alone
        return iter(loader)

    def close(self) -> None:
        self.batches = self.loader = None  # the workers exit


class StreamSteps(StepSource):
    """Each step trains on the next batch of a streaming (iterable) dataset, read through torchdata's
    `StatefulDataLoader` (`loader.*` workers and prefetch). When a pass ends the next one starts (an epoch).
    Under data parallel every rank reads the stream and keeps its share of each batch.

    A checkpoint holds the loader's state (`payload["stream"]`). Resume, and a rollback, restore it:
    a dataset (or its iterator) with `state_dict()`/`load_state_dict()` continues from its own state,
    in each worker; any other stream is reopened and the batches the pass had already given are skipped,
    exact when it yields the same items in the same order each pass (randomness from a generator of its
    own, and with workers, split by `torch.utils.data.get_worker_info`).
    """

    def __init__(self):
        self.loader: StatefulDataLoader | None = None
        self.stream: Iterator[Any] | None = None
        self.position: Position | None = None
        self.restored: dict[str, Any] | None = None  # the loader state of the checkpoint just loaded

    def next_step(self, trainer) -> StepOutput:
        state, sync, engine = trainer.state, trainer.sync, trainer.engine
        pos = state.position
        if self.stream is None or self.position is not pos:
            self.position, self.stream = pos, self._open(trainer, self._resume_state(pos))
        batch = next(self.stream, None)
        if batch is None:  # the pass is over: the next epoch
            pos.epoch, pos.batch = pos.epoch + 1, 0
            self.stream = self._open(trainer, None)
            batch = next(self.stream, None)
            if batch is None:
                from gradwise.errors import DataError

                raise DataError("data error: the streaming training set yielded no batch in a whole pass")
        pos.batch += 1
        n = rows(batch)
        lr = engine.optimizer.param_groups[0]["lr"]
        loss = engine.train_step(to_device(split(batch, sync.shard(n), n), engine.device))
        return StepOutput(loss, n, lr)

    def _resume_state(self, pos: Position) -> dict[str, Any] | None:
        """The checkpoint's loader state when it was saved at `pos` (None: a fresh pass, or skip to `pos`)."""
        restored, self.restored = self.restored, None
        if restored is not None and (restored["epoch"], restored["batch"]) == (pos.epoch, pos.batch):
            return restored["loader"]
        return None

    def _open(self, trainer, loader_state: dict[str, Any] | None) -> Iterator[Any]:
        cfg, lc, pos = trainer.cfg, trainer.cfg.loader, trainer.state.position
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self.loader = StatefulDataLoader(
                trainer.train_data, batch_size=cfg.train.batch_size, drop_last=cfg.train.drop_last,
                num_workers=lc.num_workers, pin_memory=lc.pin_memory, prefetch_factor=lc.prefetch_factor,
                persistent_workers=lc.persistent_workers,
                generator=torch.Generator().manual_seed(cfg.seed + pos.epoch))
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        stream = iter(self.loader)
        for _ in range(pos.batch if loader_state is None else 0):  # no saved state: replay the pass so far
            next(stream)
        return stream

    def on_checkpoint_save(self, trainer, payload: dict[str, Any]) -> None:
        if self.loader is not None and self.position is trainer.state.position:
            pos = self.position
            payload["stream"] = {"epoch": pos.epoch, "batch": pos.batch, "loader": self.loader.state_dict()}
        elif self.restored is not None:  # nothing read since the resume (a fit that only completes the outputs)
            payload["stream"] = self.restored

    def on_checkpoint_load(self, trainer, payload: dict[str, Any]) -> None:
        self.restored, self.stream = payload.get("stream"), None

    def close(self) -> None:
        self.loader = self.stream = None
