"""Synchronous data parallel: the process group, batch sharding and cross-rank reductions.

Every rank draws the same global batch (the single-process order) and keeps
its own contiguous share, so an epoch covers each sample exactly once and N
processes see what one process would. A rank's loss weights are its items'
share of the *global* batch times N, so DDP's gradient average equals the
single-process gradient however unevenly items fall. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradwise.errors import ConfigError
from gradwise.parallel.strategy import GradientSync

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ENV_KEYS)


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous part of n rows: sizes differ by at most one, earlier ranks take the extra."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@dataclass
class DistContext:
    """This process's place in the torchrun group (what joining it gives), and leaving it."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def finish(self) -> None:
        """Leave together and end this worker process now.

        After a final barrier the process exits without tearing down the process group and
        interpreter step by step: gloo's threads could be destroyed while still joinable during
        that teardown, aborting a finished worker ("terminate called without an active exception")
        and making torchrun report a failure. Everything the run writes is already on disk.
        """
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def init_process_group(timeout_s: float = 300.0) -> DistContext:
    """Join the group torchrun described in the environment: NCCL with CUDA, else gloo."""
    backend = default_backend()
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), backend)
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return ctx


def default_backend() -> str:
    """NCCL where CUDA is, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_sync_batchnorm(enabled: bool, backend: str) -> None:
    """train.sync_batchnorm needs CUDA: torch's SyncBatchNorm has no CPU kernel."""
    if enabled and backend != "nccl":
        raise ConfigError("config error: train.sync_batchnorm=true needs CUDA (torch's SyncBatchNorm has no "
                          "CPU kernel); on CPU each process normalises over its own shard")


def check_batch_fits(batch_size: int, world_size: int) -> None:
    """Every process needs at least one row of each global batch."""
    if batch_size < world_size:
        raise ConfigError(f"config error: train.batch_size={batch_size} is smaller than the {world_size} processes "
                          f"(--nproc x --nnodes); each needs at least one sample per step (use train.batch_size >= "
                          f"{world_size})")


class DDPSync(GradientSync):
    """Synchronous data parallel: DistributedDataParallel all-reduces during the last micro-batch's backward.

    Each rank computes on its contiguous share of every global batch and scores its share of each evaluation
    set. `reduce=False` skips the all-reduce altogether (ranks drift apart): for measuring communication cost
    only.
    """

    needs_global_count = True
    shares_evaluation = True

    def __init__(self, ctx: DistContext, reduce: bool = True, writer: Any = None):
        super().__init__(writer)
        self.ctx, self.reduce = ctx, reduce
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.restarts = restart_count()

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def prepare(self, model: torch.nn.Module, cfg, precision) -> torch.nn.Module:
        """DistributedDataParallel around `model` (BatchNorm made SyncBatchNorm with train.sync_batchnorm)."""
        check_batch_fits(cfg.train.batch_size, self.world_size)
        check_sync_batchnorm(cfg.train.sync_batchnorm, self.ctx.backend)
        if cfg.train.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [self.ctx.local_rank] if self.ctx.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def shard(self, n: int) -> slice:
        return shard(n, self.rank, self.world_size)

    def loss_weights(self, counts: list[torch.Tensor], global_count: torch.Tensor | None) -> list[torch.Tensor]:
        """Per micro-batch weights N * c_i / C_global: DDP's mean over ranks then yields the global mean loss.

        `global_count` (the global batch's items, when the caller could count them) saves an all-reduce.
        """
        if global_count is None:
            local = torch.stack([c.to(self.device) for c in counts]).sum().to(torch.float32).reshape(1)
            global_count = self.all_reduce_sum(local)[0]
        total = global_count.to(torch.float32).clamp(min=1)
        return [c.to(torch.float32) * self.world_size / total for c in counts]

    def micro_batch(self, forward_model: torch.nn.Module, last: bool):
        """`no_sync` over every micro-batch's forward and backward but the last (whose backward all-reduces)."""
        return contextlib.nullcontext() if last and self.reduce else forward_model.no_sync()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def rank_states(self, obj):
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
