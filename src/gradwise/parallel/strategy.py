"""Gradient synchronisation as a strategy: what depends on how many processes share a batch.

    loss, finite = engine.gradients(batch)   # micro-batches inside `sync.micro_batch(last)`: DDP and FSDP
                                             # reduce the gradients in the last one's backward
    engine.update(finite)                    # clip, optimizer, schedule

`GradientSync` is the interface; `SingleProcess` the one-process strategy; `DDPSync` (parallel/ddp.py) and
`FSDPSync` (parallel/fsdp.py) the torchrun group's. A strategy owns which rows of a batch (and of an
evaluation set) this process computes on, the loss weights of its micro-batches, which micro-batches skip
communication, the gradients as this process holds them (FSDP: its shards) and sums over shards, the
collectives the trainer's metrics need, and the layout of model and optimizer state in checkpoints (one file
in torch's formats; FSDP: each process's shards). Writing a checkpoint is the `writer` it is handed
(gradwise.checkpoint.writer). The collectives are abstract: a strategy that cannot do one says so.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.checkpoint.sharded import check_shards, full_states
from gradwise.checkpoint.writer import OneFile
from gradwise.memory.accumulation import loss_weights


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class GradientSync:
    """The interface every strategy answers; defaults are those of one process holding whole tensors."""

    rank = 0
    world_size = 1  # processes that share one batch (and average their gradients)
    needs_global_count = False  # True: loss weights need the whole global batch's item count
    restarts = 0  # times the process group was restarted (torchrun's elastic agent)
    shares_evaluation = False  # True: each process scores its share of an evaluation set, sums are reduced

    def __init__(self, writer: Any = None):
        self.writer = writer or OneFile()

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return default_device()

    def prepare(self, model: nn.Module, cfg: Any, precision: Any) -> nn.Module:
        """The module the step calls forward on (a wrapper such as DDP, or `model` itself)."""
        return model

    def shard(self, n: int) -> slice:
        """The rows of an n-row batch this process computes on."""
        return slice(0, n)

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's part of a global batch's sample indices."""
        return idx[self.shard(len(idx))]

    def evaluation_rows(self, n: int) -> slice:
        """The rows of an n-row evaluation set this process scores (all of them unless `shares_evaluation`)."""
        return self.shard(n) if self.shares_evaluation else slice(0, n)

    def loss_weights(self, counts: list[torch.Tensor], global_count: torch.Tensor | None) -> list[torch.Tensor]:
        """Each micro-batch's weight: its share of the batch's loss-bearing items."""
        return loss_weights(counts)

    def micro_batch(self, forward_model: nn.Module, last: bool):
        """The context a micro-batch's forward and backward run in (DDP: `no_sync` unless last)."""
        return contextlib.nullcontext()

    def local_gradients(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients as this process holds them (FSDP: its shards), for in-place work and partial sums."""
        return [p.grad for p in params if p.grad is not None]

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a per-process partial (e.g. squared norms of this process's shards) over the shards of every
        tensor: the identity unless parameters are sharded (FSDP)."""
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every process (a collective)."""
        raise NotImplementedError(f"{type(self).__name__} has no all_reduce_sum")

    def rank_states(self, obj: Any) -> list[Any]:
        """`obj` from every process, in rank order (a collective)."""
        raise NotImplementedError(f"{type(self).__name__} has no rank_states")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process (a collective)."""
        raise NotImplementedError(f"{type(self).__name__} has no broadcast")

    # -- checkpoints: the layout of model and optimizer state; writing is the writer's ---------------------------

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Model and optimizer state as this strategy checkpoints them: torch's own formats (FSDP: this
        process's shards, which its writer puts in a folder of their own)."""
        return model.state_dict(), optimizer.state_dict()

    def verify_checkpoint(self, payload: dict[str, Any]) -> None:
        """Check a sharded checkpoint's files against their checksums before anything reads them (a collective:
        each process checks every N-th file; all raise together)."""
        if "shards" in payload:
            check_shards(Path(payload["shards"]["path"]), payload["shards"]["files"], self)

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any]) -> None:
        """Load a checkpoint's model and optimizer state, and put its model-shaped states in
        `payload["model_states"]` for the callbacks (a sharded checkpoint's folder is read whole: a run
        sharded over N processes resumes here)."""
        model_state, optimizer_state, payload["model_states"] = full_states(payload)
        optimizer.load_state_dict(optimizer_state)
        model.load_state_dict(model_state)

    def save(self, path: Path, payload: dict[str, Any]) -> None:
        """Write a checkpoint through this strategy's writer (every process calls this)."""
        self.writer.save(path, payload, self)


class SingleProcess(GradientSync):
    """One process: the collectives are the identity."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def rank_states(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj
