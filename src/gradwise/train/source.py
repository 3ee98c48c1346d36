"""Where a step's gradients come from. `BatchSteps`: the next batch of the training set, through the step engine.

A source has `next_step(trainer) -> StepOutput`, `record_fields()` (extra
fields for every train and eval record), `window_metrics()` (for train records:
figures over the steps since the last one), `computes_gradients` (False for the
parameter server, whose gradients arrive from workers: gradwise.asynchronous.server)
and `configure(cfg, world_size)` (called once, when the Trainer is built: checks the
run against the source before anything is written, and returns the lr factor: the
asynchronous sources' `ps.lr_scale`, 1 otherwise).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from gradwise.errors import ConfigError, DataError, UserInputError
from gradwise.train.batch import describe, rows, split, to_device
from gradwise.train.callbacks.base import Callback, StepOutput
from gradwise.train.checks import BatchError, error_line
from gradwise.train.pipeline import BatchReader, SeededCollate, batch_loader, loader_arguments, shut_down
from gradwise.train.randomness import TRAIN_DATA, derived_seed
from gradwise.data.sampler import EpochBatches, Position
from gradwise.train.step import NonFiniteStep, group_lrs


class _AheadBatches:
    """What a DataLoader's workers read: ((epoch, batch), this rank's rows) of the next `count` batches from a
    position (as many as the fit has steps left, so the workers never prepare a batch nobody will use)."""

    def __init__(self, batches: EpochBatches, sync, count: int):
        self.batches, self.sync, self.count = batches, sync, count

    def __iter__(self) -> Iterator[tuple[tuple[int, int], list[int]]]:
        for _ in range(self.count):
            pos = self.batches.position
            key = (pos.epoch, pos.batch)
            yield key, self.sync.local_rows(self.batches.next()).tolist()


def check_same_launch(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume a run with another `--strategy async|simulate` or `--workers` than it was trained with."""
    saved = saved or StepSource.launch
    if saved["strategy"] != current["strategy"]:
        if saved["strategy"] is None:
            raise ConfigError(f"config error: this run was not trained with --strategy {current['strategy']}; "
                              f"resume it without --strategy {current['strategy']}")
        raise ConfigError(f"config error: this run was trained with --strategy {saved['strategy']} --workers "
                          f"{saved['workers']}; resume it with those flags")
    if saved["workers"] != current["workers"]:
        raise ConfigError(f"config error: the run was started with {saved['workers']} workers; resume it with "
                          f"--workers {saved['workers']}")


def step_failure(trainer, err: Exception, stage: str, where: tuple[int, int, int | None], batch: Any) -> BatchError:
    """A later batch's failure in one line, as the first-batch check reports one: the step, the batch's data
    position (`where`: epoch and batch from 0, as checkpoints hold it, and the batches per epoch, None for a
    stream's pass), its structure when it was read."""
    epoch, number, per_epoch = where
    place = f"data position: epoch {epoch}, batch {number}" + (f" of {per_epoch}" if per_epoch else " of the pass")
    structure = f", {describe(batch)}" if batch is not None else ""
    return BatchError(f"batch error: {stage} failed at step {trainer.state.step + 1} ({place}){structure}: "
                      f"{error_line(err)}; the last checkpoint is kept (fit(resume=True) continues from it)")


def batch_fault(err: Exception) -> bool:
    """Whether `err` is the batch's doing (the user's data, collate function, model or loss) rather than the
    run's or the machine's: a gradwise error, memory, a peer process or a loader worker that died."""
    if isinstance(err, (NonFiniteStep, UserInputError, MemoryError, torch.OutOfMemoryError, dist.DistError)):
        return False
    return not str(err).startswith("DataLoader worker (pid")


class StepSource(Callback):
    """The defaults every source shares; `close()` drops what it holds (loader workers) when a fit ends.
    `launch` says how the run was started (`--strategy` and `--workers` of an asynchronous run): a checkpoint
    records it, and a resume started otherwise is refused (`check_same_launch`)."""

    computes_gradients = True
    launch: dict[str, Any] = {"strategy": None, "workers": None}

    def configure(self, cfg, world_size: int) -> float:
        """Check the run against this source (a one-line error before anything is written); returns what the step
        engine multiplies the scaled optim.lr by (an asynchronous source's staleness policy)."""
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

    def run_step(self, trainer, batch: Any, samples: int, where: tuple[int, int, int | None],
                 global_count: torch.Tensor | None = None) -> StepOutput:
        """Train on `batch` (read already: `samples` rows of the global batch), a failure reported in one line
        naming the step and `where` the batch is."""
        engine = trainer.engine
        lr, lrs = engine.optimizer.param_groups[0]["lr"], group_lrs(engine.optimizer)  # the rates this update uses
        try:
            loss = self.train_step(engine, to_device(batch, engine.device), global_count)
        except Exception as err:  # the user's model, loss or batch: one line, as the first batch
            if not batch_fault(err):
                raise
            raise step_failure(trainer, err, "the training step", where, batch) from err
        return StepOutput(loss, samples, lr, lrs)

    def train_step(self, engine, batch: Any, global_count: torch.Tensor | None) -> torch.Tensor:
        """One update from `batch` (the delay simulator computes its gradient on older weights)."""
        return engine.train_step(batch, global_count)


class BatchSteps(StepSource):
    """Each step trains on the next batch in the seeded order (gradwise.data.sampler), resumable by position.

    Batches are read by the training set's `BatchReader` (its collate function, each batch under its own
    seed). Under data parallel every rank draws the same global batch and reads its strategy's shard of it.
    With `loader.num_workers` > 0, torch's DataLoader reads the batches in worker processes, in the same
    order, so the batches, and a resume mid-epoch, do not depend on the workers.
    """

    def __init__(self):
        self.batches: EpochBatches | None = None
        self.reader: BatchReader | None = None
        self.loader: Iterator[Any] | None = None

    def next_step(self, trainer) -> StepOutput:
        cfg, state, sync, engine = trainer.cfg, trainer.state, trainer.sync, trainer.engine
        if self.batches is None or self.batches.position is not state.position:  # a new run, a resume or a rollback
            self.close()
            self.batches = EpochBatches(len(trainer.train_data), cfg.train.batch_size, cfg.seed, cfg.train.drop_last,
                                        state.position)
            self.reader = BatchReader(trainer.train_data, trainer.data["train"].collate_fn,
                                      derived_seed(cfg.seed, TRAIN_DATA, sync.rank))
            self.loader = self._loader(trainer) if cfg.loader.num_workers else None
        pos = self.batches.position
        key = pos.epoch, pos.batch
        where = pos.epoch, pos.batch, self.batches.per_epoch
        idx = self.batches.next()
        global_count = None
        if sync.needs_global_count and isinstance(trainer.train_data, TensorDataset) \
                and self.reader.collate_fn is None:  # no collective needed
            global_count = engine.count_fn(trainer.train_data.tensors[-1][idx]).to(engine.device)
        try:
            batch = next(self.loader) if self.loader is not None else self.reader.read(key, sync.local_rows(idx))
        except Exception as err:  # the user's dataset or collate function
            if not batch_fault(err):
                raise
            raise step_failure(trainer, err, "reading the batch", where, None) from err
        return self.run_step(trainer, batch, len(idx), where, global_count)

    def _loader(self, trainer) -> Iterator[Any]:
        cfg, pos = trainer.cfg, trainer.state.position
        ahead = EpochBatches(len(trainer.train_data), cfg.train.batch_size, cfg.seed, cfg.train.drop_last,
                             Position(pos.epoch, pos.batch))
        requests = _AheadBatches(ahead, trainer.sync, trainer.state.end - trainer.state.step)
        return iter(batch_loader(self.reader, requests, loader_settings(trainer), cfg.seed))

    def close(self) -> None:
        shut_down(self.loader)
        self.batches = self.loader = None


def loader_settings(trainer) -> dict[str, Any]:
    """The training loader's settings: the config's `loader.*` and the hooks of a DataLoader the user passed."""
    return {**trainer.cfg.loader.model_dump(), **trainer.data["train"].hooks}


def _holds_stream_state(loader_state: Any) -> bool:
    """Whether a StatefulDataLoader state holds the stream's own state (its dataset's or its iterator's, in any
    worker), which the loader restores, rather than a position it replays the pass to."""
    return isinstance(loader_state, dict) and any(
        (key in ("dataset_state", "dataset_iter_state") and value is not None) or _holds_stream_state(value)
        for key, value in loader_state.items())


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
        sync, pos = trainer.sync, trainer.state.position
        if self.stream is None or self.position is not pos:
            self.position, self.stream = pos, self._open(trainer, self._resume_state(pos))
        batch = self._next(trainer)
        if batch is None:  # the pass is over: the next epoch
            pos.epoch, pos.batch = pos.epoch + 1, 0
            self.stream = self._open(trainer, None)
            batch = self._next(trainer)
            if batch is None:
                raise DataError("data error: the streaming training set yielded no batch in a whole pass")
        pos.batch += 1
        n = rows(batch)
        return self.run_step(trainer, split(batch, sync.shard(n), n), n, (pos.epoch, pos.batch - 1, None))

    def _next(self, trainer) -> Any:
        pos = trainer.state.position
        try:
            return next(self.stream, None)
        except Exception as err:  # the user's stream or collate function
            if not batch_fault(err):
                raise
            raise step_failure(trainer, err, "reading the batch", (pos.epoch, pos.batch, None), None) from err

    def _resume_state(self, pos: Position) -> dict[str, Any] | None:
        """The checkpoint's loader state when it was saved at `pos` (None: a fresh pass, or skip to `pos`)."""
        restored, self.restored = self.restored, None
        if restored is not None and (restored["epoch"], restored["batch"]) == (pos.epoch, pos.batch):
            return restored["loader"]
        return None

    def _open(self, trainer, loader_state: dict[str, Any] | None) -> Iterator[Any]:
        cfg, lc, pos = trainer.cfg, trainer.cfg.loader, trainer.state.position
        collate = trainer.data["train"].collate_fn
        if collate is not None:
            # each batch collated under its own seed, keyed by the worker's count of batches: where the loader
            # restores the stream's own state, the counts resume as served so far (the workers in turn);
            # where it replays the pass, the replay counts them again from 0
            workers = max(1, lc.num_workers)
            resumes = _holds_stream_state(loader_state)
            starts = [len(range(w, pos.batch, workers)) if resumes else 0 for w in range(workers)]
            collate = SeededCollate(collate, derived_seed(cfg.seed, TRAIN_DATA, trainer.sync.rank), pos.epoch, starts)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self.loader = StatefulDataLoader(trainer.train_data, batch_size=cfg.train.batch_size,
                                             drop_last=cfg.train.drop_last, collate_fn=collate,
                                             **loader_arguments(loader_settings(trainer), cfg.seed + pos.epoch))
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        stream = iter(self.loader)
        for _ in range(pos.batch if loader_state is None else 0):  # no saved state: replay the pass so far
            next(stream)
        return stream

    def state_dict(self, trainer) -> dict[str, Any] | None:
        if self.loader is not None and self.position is trainer.state.position:
            pos = self.position
            return {"epoch": pos.epoch, "batch": pos.batch, "loader": self.loader.state_dict()}
        return self.restored  # nothing read since the resume (a fit that only completes the outputs), or None

    def load_state_dict(self, trainer, state: dict[str, Any] | None) -> None:
        self.restored, self.stream = state, None

    def close(self) -> None:
        shut_down(self.stream)
        self.loader = self.stream = None
