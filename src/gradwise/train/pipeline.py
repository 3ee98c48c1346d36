"""Your data pipeline as you have it: a collate function, or the DataLoader you built, and how batches are read.

`as_pipeline(data, role, collate_fn)` turns what the user passed as `train_data`, `val_data` or `test_data`
into a `Pipeline`: the dataset, its collate function, and, when it was a DataLoader (torch's or torchdata's
`StatefulDataLoader`), the settings gradwise adopts from it (batch size, drop_last, workers, pinning,
prefetch, persistence, worker_init_fn, multiprocessing context). Its sampler is replaced by gradwise's
seeded, resumable order; what cannot be honoured (a batch sampler or sampler of its own, a setting that
contradicts one the config gives explicitly) is a one-line `DataError`. `adopt_settings` writes the
adopted settings into the config, so config.yaml records them and a resume rebuilds the same run.

`BatchReader` reads one batch of a map-style dataset: its items by index, collated (the user's function,
else torch's `default_collate`; a `TensorDataset` without one: one indexing op per tensor), under that
batch's own seed (gradwise.train.randomness), in the training process or in a loader worker alike.
`SeededCollate` does the same for a stream's batches.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Iterable

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler, TensorDataset, default_collate, get_worker_info)

from gradwise.config import Config, validate
from gradwise.errors import DataError
from gradwise.train.batch import fetch_batch
from gradwise.train.randomness import batch_rng, derived_seed

LOADER_KEYS = ("num_workers", "pin_memory", "prefetch_factor", "persistent_workers")  # adopted into cfg.loader
HOOKS = ("worker_init_fn", "multiprocessing_context", "timeout")  # adopted, passed to gradwise's own loaders


def _stateful_types() -> tuple[type, ...]:
    from torchdata.stateful_dataloader import sampler as stateful

    return stateful.BatchSampler, stateful.RandomSampler


def _is_default_collate(fn: Callable | None) -> bool:
    """torch's own (default_collate, or default_convert for batch_size=None) rather than the user's."""
    return fn is None or fn is default_collate or getattr(fn, "__name__", "") in ("default_collate", "default_convert")


@dataclasses.dataclass
class Pipeline:
    """A data argument resolved: the dataset, how its batches are collated, and what its DataLoader set."""

    dataset: Dataset
    collate_fn: Callable | None = None
    batch_size: int | None = None  # the DataLoader's
    drop_last: bool = False
    loader: dict[str, Any] = dataclasses.field(default_factory=dict)  # LOADER_KEYS the DataLoader set
    hooks: dict[str, Any] = dataclasses.field(default_factory=dict)  # HOOKS the DataLoader set
    note: str | None = None  # what gradwise did with the DataLoader (the info line)

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, IterableDataset)


def as_pipeline(data: Any, role: str, collate_fn: Callable | None = None) -> Pipeline | None:
    """`data` (a Dataset, a DataLoader or None) as a Pipeline; `collate_fn` is the Trainer's own."""
    if data is None:
        return None
    if isinstance(data, Pipeline):
        return data
    if not isinstance(data, DataLoader):
        return Pipeline(data, collate_fn)
    loader, kind = data, type(data).__name__
    if loader.batch_size is None:
        what = f"a batch_sampler of its own ({type(loader.batch_sampler).__name__})" \
            if loader.batch_sampler is not None else "batch_size=None (its dataset yields whole batches)"
        raise DataError(f"data error: {role} is a {kind} with {what}, which gradwise cannot honour: it draws "
                        f"batches in its own seeded, resumable order; pass {role}=loader.dataset with "
                        f"train.batch_size=N (and collate_fn=...), or a {kind} with batch_size=N")
    if type(loader.batch_sampler) not in (BatchSampler, *_stateful_types()):
        raise DataError(f"data error: {role} is a {kind} with a batch_sampler of its own "
                        f"({type(loader.batch_sampler).__name__}), which gradwise cannot honour: it draws batches "
                        f"in its own seeded, resumable order; pass {role}=loader.dataset with train.batch_size=N")
    own = None if _is_default_collate(loader.collate_fn) else loader.collate_fn
    if own is not None and collate_fn is not None and own is not collate_fn:
        raise DataError(f"data error: {role} is a {kind} with a collate_fn of its own ({_name(own)}) and "
                        f"collate_fn={_name(collate_fn)} was passed too; pass one of them")
    sampler = loader.sampler
    streaming = isinstance(loader.dataset, IterableDataset)
    if not streaming and type(sampler) not in (SequentialSampler, RandomSampler, DistributedSampler,
                                               *_stateful_types()[1:]):
        raise DataError(f"data error: {role} is a {kind} with the sampler {type(sampler).__name__}, which gradwise "
                        f"cannot honour: it replaces the sampler with its own seeded, resumable order (allowed: "
                        f"shuffle=True/False, RandomSampler, SequentialSampler, DistributedSampler); build the "
                        f"weighting or subset into the dataset (e.g. torch.utils.data.Subset) instead")
    workers = loader.num_workers
    settings = {"num_workers": workers, "pin_memory": bool(loader.pin_memory),
                "prefetch_factor": loader.prefetch_factor if workers else None,
                "persistent_workers": bool(loader.persistent_workers)}
    hooks = {"worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
             "timeout": loader.timeout}
    order = "its stream's order kept" if streaming else \
        f"its {type(sampler).__name__} replaced by gradwise's seeded, resumable order"
    note = (f"{role} is a {kind}: gradwise trains on its dataset ({type(loader.dataset).__name__}) with its "
            f"batch_size {loader.batch_size}, {workers} workers{', its collate_fn' if own else ''}; {order}")
    return Pipeline(loader.dataset, own or collate_fn, loader.batch_size, bool(loader.drop_last), settings,
                    {k: v for k, v in hooks.items() if v}, note)


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def adopt_settings(cfg: Config, train: Pipeline) -> Config:
    """`cfg` with the training DataLoader's settings (train.batch_size, train.drop_last, loader.*) where the
    config does not give them explicitly; an explicit value the DataLoader contradicts is a DataError."""
    if train.batch_size is None:
        return cfg
    wanted = {("train", "batch_size"): train.batch_size,
              **{("loader", key): value for key, value in train.loader.items()}}
    if train.drop_last:  # drop_last=False is a DataLoader's default: only True says something
        wanted[("train", "drop_last")] = True
    raw = cfg.to_dict()
    for (section, key), value in wanted.items():
        part = getattr(cfg, section)
        if getattr(part, key) == value:
            continue
        if key in part.model_fields_set:
            raise DataError(f"data error: train_data is a DataLoader with {key}={value!r}, but the config gives "
                            f"{section}.{key}={getattr(part, key)!r}; drop one of them (or pass the dataset)")
        raw[section][key] = value
    return validate(raw)


def pipelines(collate_fn: Callable | None, **data: Any) -> dict[str, Pipeline | None]:
    """`{role: Pipeline}` for the Trainer's `train_data=`, `val_data=`, `test_data=` arguments."""
    return {role: as_pipeline(value, f"{role}_data", collate_fn) for role, value in data.items()}


def report_adoption(data: dict[str, Pipeline | None], cfg: Config, is_main: bool) -> None:
    """Print what gradwise did with each DataLoader it adopted (a line each, rank 0, unless log.progress=off)."""
    for pipeline in data.values():
        if is_main and pipeline is not None and pipeline.note and cfg.log.progress != "off":
            print(f"gradwise: {pipeline.note}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class BatchReader:
    """Reads batches of a map-style dataset, each under its own seed (see the module docstring); picklable,
    so a loader's workers read with it too. `reader[(key, indices)]` is what a DataLoader fetches."""

    dataset: Dataset
    collate_fn: Callable | None
    seed: int  # the stream's: derived_seed(run seed, stream, rank)

    def read(self, key: tuple[int, ...], idx: torch.Tensor | list[int]) -> Any:
        """Rows `idx` as one batch; `key` names the batch within the stream (its seed)."""
        if self.collate_fn is None and isinstance(self.dataset, TensorDataset):  # no randomness: the fast path
            return fetch_batch(self.dataset, torch.as_tensor(idx, dtype=torch.long))
        items = idx.tolist() if isinstance(idx, torch.Tensor) else idx
        with batch_rng(derived_seed(self.seed, *key)):
            return (self.collate_fn or default_collate)([self.dataset[i] for i in items])

    def __getitem__(self, request: tuple[tuple[int, ...], list[int]]) -> Any:
        return self.read(*request)


def _as_is(batch: Any) -> Any:
    """A loader's collate step for batches its reader already collated."""
    return batch


def batch_loader(reader: BatchReader, requests: Iterable[tuple[tuple[int, ...], list[int]]], settings: dict,
                 seed: int) -> DataLoader:
    """A DataLoader whose workers read `requests` ((key, indices) pairs, in order) with `reader`."""
    prefetch = settings.get("prefetch_factor") if settings.get("num_workers") else None
    extra = {k: v for k, v in settings.items() if k in HOOKS and v}
    return DataLoader(reader, sampler=requests, batch_size=None, collate_fn=_as_is,
                      num_workers=settings.get("num_workers", 0), pin_memory=settings.get("pin_memory", False),
                      prefetch_factor=prefetch, persistent_workers=settings.get("persistent_workers", False),
                      generator=torch.Generator().manual_seed(seed), **extra)  # leaves the global RNG alone


class SeededCollate:
    """A stream's collate function run under each batch's own seed, keyed by (epoch, worker, the worker's
    batch count); `starts` are the workers' counts where the pass resumes."""

    def __init__(self, collate_fn: Callable, seed: int, epoch: int, starts: list[int]):
        self.collate_fn, self.seed, self.epoch, self.starts = collate_fn, seed, epoch, starts
        self.count: int | None = None  # this process's (each worker has its own copy)

    def __call__(self, items: list[Any]) -> Any:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if self.count is None:
            self.count = self.starts[worker]
        key, self.count = self.count, self.count + 1
        with batch_rng(derived_seed(self.seed, self.epoch, worker, key)):
            return self.collate_fn(items)
