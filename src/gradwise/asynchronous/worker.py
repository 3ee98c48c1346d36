"""The parameter server's workers: the step engine's first call, then a push.

A worker owns every M-th row of the training set and loops: pull the server's
weights (a ticket for one gradient), compute a gradient on its next batch with
`StepEngine.gradients` (micro-batches, precision, loss scaling, the finiteness
check), and push it through its `ServerLink`. The worker never applies an
update: the server does (gradwise.asynchronous.server).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from gradwise.arguments import check_callable, check_metrics
from gradwise.asynchronous.buffers import buffer_contributions, snapshot_buffers
from gradwise.config import Config, validate
from gradwise.data.sampler import EpochBatches, Position
from gradwise.errors import DataError
from gradwise.train.batch import to_device
from gradwise.train.factories import RunData, config_data, config_loss, config_model
from gradwise.train.pipeline import BatchReader, Pipeline, as_pipeline
from gradwise.train.randomness import TRAIN_DATA, derived_seed, seed_everything
from gradwise.train.step import NonFiniteStep, StepEngine

try:
    import ray  # the `async` extra: the driver refuses to start without it (gradwise.asynchronous.ps)
except ImportError:
    ray = None


@dataclass
class UserRun:
    """Your own model and data for the parameter server, as picklable factories each actor calls:
    `model()` -> nn.Module (seeded by the actor: the server's weights are what workers pull), `data()` ->
    (train, test or None) map-style datasets, and optionally `loss_fn` (see gradwise.train.batch),
    `collate_fn` (batches items, in every worker and for the server's evaluation) and `metrics` (as
    `Trainer(metrics=...)`, computed on the server)."""

    model: Callable[[], torch.nn.Module]
    data: Callable[[], tuple[Any, Any]]
    loss_fn: Callable | None = None
    collate_fn: Callable | None = None
    metrics: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_callable("UserRun.model", self.model, "a picklable function () -> nn.Module", optional=False)
        check_callable("UserRun.data", self.data, "a picklable function () -> (train, test)", optional=False)
        check_callable("UserRun.loss_fn", self.loss_fn, "a function loss_fn(output, target)")
        check_callable("UserRun.collate_fn", self.collate_fn, "a function collate_fn(list of samples) -> batch")
        check_metrics("UserRun.metrics", self.metrics)

    def datasets(self) -> tuple[Any, Any]:
        """`data()`'s (train, test), checked: datasets, not DataLoaders (their settings would not reach the
        workers, which read their rows through gradwise's reader)."""
        train, test = self.data()
        for role, data in (("train", train), ("test", test)):
            if isinstance(data, DataLoader):
                raise DataError(f"data error: UserRun.data() returned a DataLoader as the {role} set; return its "
                                f"dataset and pass UserRun(collate_fn=...) and train.batch_size=N instead")
        return train, test


def training_set(cfg: Config, user: UserRun | None) -> tuple[Pipeline, RunData | None]:
    """(the training set as a Pipeline, the config's data) as every actor builds them, seeded by `cfg.seed` (the
    same rows everywhere, even a seeded random split): `user`'s, else the config's (built-in, or `data.factory`'s:
    a DataLoader stands for its dataset and collate function, its settings adopted by the driver)."""
    seed_everything(cfg.seed)
    if user is not None:
        return as_pipeline(user.datasets()[0], "train_data", user.collate_fn), None
    data = config_data(cfg)
    return as_pipeline(data.train, "train_data", data.collate_fn), data


def worker_shard(n: int, worker: int, workers: int) -> torch.Tensor:
    """Rows of the training set worker `worker` owns: every M-th row (all rows, in order, for one worker)."""
    return torch.arange(worker, n, workers)


class ServerLink:
    """A worker's side of the protocol: `pull` the server's weights (a ticket for one gradient), then `push` the
    gradient computed on them, or `drop` it (an fp16 overflow: the ticket goes back). `slowdown` > 1 simulates
    a straggler: each gradient takes that many times as long."""

    def __init__(self, server: Any, worker: int, slowdown: float = 1.0):
        self.server, self.worker, self.slowdown = server, worker, slowdown
        self.clock, self.started = 0, 0.0
        self.pushed = 0
        self.pulled_buffers: dict[str, torch.Tensor] = {}

    def pull(self, model: torch.nn.Module) -> bool:
        """Load the server's current weights into `model`; False when the run's budget is spent."""
        pulled = ray.get(self.server.pull.remote(self.worker))
        if pulled is None:
            return False
        model.load_state_dict(pulled["state"])
        self.pulled_buffers = snapshot_buffers(model)
        self.clock, self.started = pulled["clock"], time.perf_counter()
        return True

    def push(self, model: torch.nn.Module, params: list[torch.Tensor], loss: torch.Tensor, position: dict,
             samples: int) -> None:
        """Push the gradient of `params` and what the forward did to `model`'s buffers
        (gradwise.asynchronous.buffers)."""
        grads = [p.grad.detach().to("cpu", torch.float32).clone() if p.grad is not None else torch.zeros_like(p)
                 for p in params]
        buffers = buffer_contributions(model, self.pulled_buffers)
        elapsed = time.perf_counter() - self.started
        if self.slowdown > 1:
            time.sleep(elapsed * (self.slowdown - 1))
            elapsed *= self.slowdown
        applied = ray.get(self.server.push.remote(self.worker, self.clock, grads, float(loss), position, samples,
                                                  elapsed, buffers))
        self.pushed += int(applied)

    def drop(self) -> None:
        ray.get(self.server.drop.remote(self.worker))


class Worker:
    """A worker actor's logic (wrapped by `ray.remote` in gradwise.asynchronous.ps): its shard, engine and loop."""

    def __init__(self, cfg_dict: dict, worker: int, workers: int, server: Any, user: UserRun | None = None):
        cfg = validate(cfg_dict)  # the driver's resolved config, the one the server trains with
        self.cfg, self.worker, self.server = cfg, worker, server
        torch.set_num_threads(cfg.ps.worker_threads or max(1, (os.cpu_count() or 1) // workers))
        pipeline, data = training_set(cfg, user)
        train = pipeline.dataset
        rows = worker_shard(len(train), worker, workers)
        self.shard = TensorDataset(*(t[rows] for t in train.tensors)) if isinstance(train, TensorDataset) \
            else Subset(train, rows.tolist())
        seed_everything(cfg.seed + worker)
        model = user.model() if user else config_model(cfg, data)
        self.link = ServerLink(server, worker, cfg.ps.slowdowns().get(worker, 1.0))
        # gradients only, in one process: the updates are the server's
        loss_fn = user.loss_fn if user else config_loss(cfg)
        self.engine = StepEngine(model, cfg, loss_fn=loss_fn, updates=False)
        self.reader = BatchReader(self.shard, pipeline.collate_fn, derived_seed(cfg.seed, TRAIN_DATA, worker))

    def pid(self) -> int:
        """This incarnation's process id (a restarted actor has a new one)."""
        return os.getpid()

    def run(self) -> int:
        """Pull, compute, push until the server's budget is spent; returns the gradients this call pushed."""
        cfg, link, engine = self.cfg, self.link, self.engine
        start = ray.get(self.server.join.remote(self.worker))["position"] or {"epoch": 0, "batch": 0}
        batches = EpochBatches(len(self.shard), cfg.train.batch_size, cfg.seed + self.worker, cfg.train.drop_last,
                               Position(start["epoch"], start["batch"]))
        link.pushed = 0
        while link.pull(engine.model):
            key = batches.position.epoch, batches.position.batch
            idx = batches.next()
            batch = to_device(self.reader.read(key, idx), engine.device)
            try:
                loss, finite = engine.gradients(batch)
            except NonFiniteStep as event:  # the server stops the run, naming the layer
                ray.get(self.server.fail.remote(self.worker, event.where, event.stage))
                break
            if finite:
                where = {"epoch": batches.position.epoch, "batch": batches.position.batch}
                link.push(engine.model, engine.params, loss, where, len(idx))
            else:
                link.drop()
            engine.precision.settle(finite)  # the update is the server's; the loss scale is this worker's
        return link.pushed
