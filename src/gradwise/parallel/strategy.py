"""Gradient synchronisation as a strategy: the middle of the three moves of every step.

    loss   = engine.compute_gradients(...)    # micro-batches inside `sync.micro_batch(last)`
    apply  = sync.synchronize(params, ...)    # nothing | DDP (done in backward) | push to a server
    if apply: engine.apply_update(...)

`GradientSync` itself is the single-process strategy: nothing to synchronise.
`DDPSync` (distributed/ddp.py) and `PushPull` (distributed/ps_worker.py)
override what differs. A strategy owns everything that depends on how many
processes share a batch: which rows of a batch this process computes on, the
loss weights of its micro-batches, which micro-batches skip communication,
the collectives the trainer's metrics need, and how model and optimizer state
are saved and loaded (one file in torch's formats; FSDP: each process's shards,
gradwise.checkpoint.sharded).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.checkpoint.sharded import check_shards, full_states, remove_other_folders
from gradwise.io import write_with
from gradwise.memory.accumulation import loss_weights
from gradwise.checkpoint.format import with_header


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class GradientSync:
    """One process: every call is the identity. Subclass and override for other strategies."""

    rank = 0
    world_size = 1  # processes that share one batch (and average their gradients)
    needs_global_count = False  # True: loss weights need the whole global batch's item count
    restarts = 0  # times the process group was restarted (torchrun's elastic agent)
    sharded = False  # True: each process holds only shards of the parameters (FSDP); see `shard_sum`

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return default_device()

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        """The module the step calls forward on (a wrapper such as DDP, or `model` itself)."""
        return model

    def shard(self, n: int) -> slice:
        """The rows of an n-row batch (or evaluation set) this process computes on."""
        return slice(0, n)

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's part of a global batch's sample indices."""
        return idx

    def loss_weights(self, counts: list[torch.Tensor], global_count: torch.Tensor | None) -> list[torch.Tensor]:
        """Each micro-batch's weight: its share of the batch's loss-bearing items."""
        return loss_weights(counts)

    def micro_batch(self, forward_model: nn.Module, last: bool):
        """The context a micro-batch's forward and backward run in (DDP: `no_sync` unless last)."""
        return contextlib.nullcontext()

    def synchronize(self, params: list[torch.Tensor], finite: bool, loss: torch.Tensor) -> bool:
        """Make the gradients in `params` this update's gradients; True when this process applies the update."""
        return True

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a per-process partial (e.g. squared norms of this process's shards) over the shards of every
        tensor: identity unless parameters are sharded (FSDP)."""
        return tensor

    def rank_states(self, obj: Any) -> list[Any] | None:
        """`obj` from every rank in rank order (a collective), or None for one process."""
        return None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        return obj

    # -- checkpoints: one file here; a sharded strategy writes each process's shards ------------------------------

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Model and optimizer state as this strategy checkpoints them: torch's own formats (FSDP: this
        process's shards, which `save` writes to a folder of their own)."""
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
        """Write a checkpoint (every rank calls this; one file, written by the main process, atomically, with
        the header and checksum of gradwise.checkpoint.format)."""
        if self.is_main:
            marked = with_header(payload)
            write_with(path, lambda handle: torch.save(marked, handle))
            if "shards" not in payload:  # a sharded run resumed here: its folders are no longer named
                remove_other_folders(path.parent, keep="")
