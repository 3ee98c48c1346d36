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
from torchdata.stateful_dataloader.sampler import BatchSampler as StatefulBatchSampler
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler, TensorDataset, default_collate, get_worker_info)

from gradwise.config import Config, validate
from gradwise.arguments import check_data
from gradwise.errors import DataError
from gradwise.train.batch import fetch_batch, first_rows
from gradwise.train.randomness import batch_rng, derived_seed

HOOKS = ("worker_init_fn", "multiprocessing_context", "timeout")  # adopted, passed to gradwise's own loaders


# what gradwise replaces by its own order: torch's and torchdata's plain batch samplers and samplers
BATCH_SAMPLERS = (BatchSampler, StatefulBatchSampler)
SAMPLERS = (SequentialSampler, RandomSampler, StatefulRandomSampler, DistributedSampler, StatefulDistributedSampler)


@dataclasses.dataclass
class Pipeline:
    """A data argument resolved: the dataset, how its batches are collated, and what its DataLoader set."""

    dataset: Dataset
    collate_fn: Callable | None = None
    batch_size: int | None = None  # the DataLoader's (per process, as torch's DataLoaders are)
    drop_last: bool = False
    loader: dict[str, Any] = dataclasses.field(default_factory=dict)  # the loader.* settings it set (non-default)
    hooks: dict[str, Any] = dataclasses.field(default_factory=dict)  # HOOKS the DataLoader set
    note: str | None = None  # what gradwise did with the DataLoader (the info line)
    evaluation_loader: DataLoader | None = None  # kept between evaluations when its workers persist

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, IterableDataset)

    def settings(self) -> dict[str, Any]:
        """DataLoader keyword arguments for reading this set: its workers, pinning, prefetch and hooks."""
        return {**self.loader, **self.hooks}

    def first_batch(self, n: int = 2) -> Any:
        """The first `n` items as one batch, read as the run reads them: in a loader worker when the DataLoader
        came with a worker_init_fn (which the dataset may need: a file opened per worker), else here."""
        if not (self.hooks.get("worker_init_fn") and self.loader.get("num_workers")):
            return first_rows(self.dataset, n, self.collate_fn)
        if self.streaming:
            loader = DataLoader(self.dataset, batch_size=n, collate_fn=self.collate_fn,
                                **loader_arguments(self.settings(), 0))
        else:
            rows = list(range(min(n, len(self.dataset))))
            loader = batch_loader(BatchReader(self.dataset, self.collate_fn, 0), [((0,), rows)], self.settings(), 0)
        batches = iter(loader)
        try:
            return next(batches)
        finally:
            shut_down(batches)


def _refuse(role: str, kind: str, what: str, instead: str) -> DataError:
    return DataError(f"data error: {role} is a {kind} with {what}, which gradwise cannot honour: it draws batches "
                     f"in its own seeded, resumable order; {instead}")


def as_pipeline(data: Any, role: str, collate_fn: Callable | None = None) -> Pipeline | None:
    """`data` (a Dataset, a DataLoader or None) as a Pipeline; `collate_fn` is the Trainer's own."""
    if data is None or isinstance(data, Pipeline):
        return data
    check_data(role, data)
    if not isinstance(data, DataLoader):
        return Pipeline(data, collate_fn)
    loader, kind = data, type(data).__name__
    dataset_instead = f"pass {role}=loader.dataset with train.batch_size=N (and collate_fn=...)"
    if loader.batch_size is None or type(loader.batch_sampler) not in BATCH_SAMPLERS:
        what = "batch_size=None (its dataset yields whole batches)" if loader.batch_sampler is None else \
            f"a batch_sampler of its own ({type(loader.batch_sampler).__name__})"
        raise _refuse(role, kind, what, f"{dataset_instead}, or a {kind} with batch_size=N")
    sampler = loader.sampler
    streaming = isinstance(loader.dataset, IterableDataset)
    if not streaming and (type(sampler) not in SAMPLERS or getattr(sampler, "replacement", False)
                          or getattr(sampler, "_num_samples", None) is not None):
        shown = type(sampler).__name__ + (" drawing with replacement or a number of samples of its own"
                                          if type(sampler) in SAMPLERS else "")
        raise _refuse(role, kind, f"the sampler {shown}",
                      "allowed: shuffle=True/False, RandomSampler, SequentialSampler, DistributedSampler; build "
                      "a weighting or subset into the dataset (e.g. torch.utils.data.Subset) instead")
    own = None if loader.collate_fn in (None, default_collate) else loader.collate_fn
    if own is not None and collate_fn is not None and own is not collate_fn:
        raise DataError(f"data error: {role} is a {kind} with a collate_fn of its own ({_name(own)}) and "
                        f"collate_fn={_name(collate_fn)} was passed too; pass one of them")
    workers = loader.num_workers
    prefetch = loader.prefetch_factor if workers and loader.prefetch_factor != 2 else None  # torch's: 2
    settings = {"num_workers": workers, "pin_memory": loader.pin_memory,
                "persistent_workers": loader.persistent_workers, "prefetch_factor": prefetch}
    hooks = {"worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
             "timeout": loader.timeout}
    order = "its stream's order kept" if streaming else \
        f"its {type(sampler).__name__} replaced by gradwise's seeded, resumable order"
    note = (f"{role} is a {kind}: gradwise reads its dataset ({type(loader.dataset).__name__}) with its "
            f"batch_size {loader.batch_size} per process, {workers} workers{', its collate_fn' if own else ''}; "
            f"{order}")
    return Pipeline(loader.dataset, own or collate_fn, loader.batch_size, bool(loader.drop_last),
                    {k: v for k, v in settings.items() if v}, {k: v for k, v in hooks.items() if v}, note)


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def adopt_settings(cfg: Config, train: Pipeline, world_size: int = 1) -> Config:
    """`cfg` with the training DataLoader's settings where the config does not give them: train.batch_size
    (the loader's batch per process times the processes: gradwise's batch is global), train.drop_last and
    loader.*. Only what the DataLoader sets away from torch's defaults counts; an explicit config value (or
    any value of a resolved config) that it contradicts is a DataError."""
    if train.batch_size is None:
        return cfg
    wanted = {("train", "batch_size"): train.batch_size * world_size,
              **{("loader", key): value for key, value in train.loader.items()}}
    if train.drop_last:  # drop_last=False is a DataLoader's default: only True says something
        wanted[("train", "drop_last")] = True
    raw = cfg.to_dict()
    for (section, key), value in wanted.items():
        part = getattr(cfg, section)
        if getattr(part, key) == value:
            continue
        if part.given(key):
            per = f" ({train.batch_size} per process x {world_size})" if key == "batch_size" and world_size > 1 else ""
            raise DataError(f"data error: train_data is a DataLoader with {key}={value!r}{per}, but the config "
                            f"gives {section}.{key}={getattr(part, key)!r}; drop one of them (or pass the dataset)")
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


class BatchReader:
    """Reads batches of a map-style dataset, each under its own seed (see the module docstring); picklable,
    so a loader's workers read with it too. `reader[(key, indices)]` is what a DataLoader fetches.

    In a loader worker `torch.utils.data.get_worker_info().dataset` is this reader: it stands in for the
    dataset there, attributes read and set going to the dataset, so a `worker_init_fn` that opens a file on
    `get_worker_info().dataset` works as with the user's own DataLoader."""

    OWN = ("dataset", "collate_fn", "seed")

    def __init__(self, dataset: Dataset, collate_fn: Callable | None, seed: int):
        self.__dict__.update(dataset=dataset, collate_fn=collate_fn, seed=seed)  # seed: derived for the stream

    def read(self, key: tuple[int, ...], idx: torch.Tensor | list[int]) -> Any:
        """Rows `idx` as one batch; `key` names the batch within the stream (its seed)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.collate_fn is None and isinstance(self.dataset, TensorDataset):  # no randomness: the fast path
            return fetch_batch(self.dataset, idx)
        with batch_rng(derived_seed(self.seed, *key)):
            return fetch_batch(self.dataset, idx, self.collate_fn)

    def __getitem__(self, request: tuple[tuple[int, ...], list[int]]) -> Any:
        return self.read(*request)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "dataset" not in self.__dict__:  # pickling's lookups
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.OWN:
            self.__dict__[name] = value
        else:
            setattr(self.dataset, name, value)


def shut_down(loader_iterator: Any) -> None:
    """Stop a DataLoader iterator's worker processes now (a raised exception's traceback may keep the iterator,
    and with it the workers, alive)."""
    stop = getattr(loader_iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()


def _as_is(batch: Any) -> Any:
    """A loader's collate step for batches its reader already collated."""
    return batch


def batch_loader(reader: BatchReader, requests: Iterable[tuple[tuple[int, ...], list[int]]], settings: dict,
                 seed: int) -> DataLoader:
    """A DataLoader whose workers read `requests` ((key, indices) pairs, in order) with `reader`."""
    return DataLoader(reader, sampler=requests, batch_size=None, collate_fn=_as_is, **loader_arguments(settings, seed))


def loader_arguments(settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """DataLoader keyword arguments from `settings` (loader.* and HOOKS), with a generator seeded from `seed` so
    that the workers' seeds never come from the global RNG."""
    workers = settings.get("num_workers", 0)
    return {"num_workers": workers, "pin_memory": bool(settings.get("pin_memory")),
            "prefetch_factor": settings.get("prefetch_factor") if workers else None,
            "persistent_workers": bool(settings.get("persistent_workers")) and workers > 0,
            "generator": torch.Generator().manual_seed(seed), **{k: settings[k] for k in HOOKS if settings.get(k)}}


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
