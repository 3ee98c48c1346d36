"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`): each process keeps 1/N of the
parameters, gradients and optimizer state.

The batch is shared exactly as under DDP (`DDPSync`: the same rows per rank, the same loss weights, since
FSDP's reduce-scatter averages gradients over ranks as DDP's all-reduce does). What differs:

- `prepare` wraps each block (a `BlockStack` entry of a built-in model, or the classes named in
  `train.shard_modules`) and then the root with `fully_shard`; parameters become DTensors sharded on dim 0.
  The mixed-precision policy is the step's `Precision`'s: under bf16 the blocks compute in bf16 while the
  sharded master parameters, the gradient reduction and the optimizer state stay fp32.
- `micro_batch` turns the reduce-scatter off on every micro-batch but the last (`set_requires_gradient_sync`).
- `local_gradients` are this process's shards; `shard_sum` adds a tensor over the shards (one all-reduce):
  the global gradient norm, the finiteness and overflow flags, the health figures.
- checkpoints are sharded (its writer: `gradwise.checkpoint.writer.Shards`): each process writes its own
  shards with torch.distributed.checkpoint, and a run resumes from them on any number of processes, under
  FSDP (DCP reshards) or any other strategy (which reads the folder whole): gradwise.checkpoint.sharded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.checkpoint.sharded import by_name, load_sharded
from gradwise.checkpoint.writer import Shards
from gradwise.errors import ConfigError
from gradwise.memory.checkpointing import repeated_blocks
from gradwise.nn.blocks import BlockStack
from gradwise.optim.layerwise import local
from gradwise.parallel.ddp import DDPSync, check_batch_fits


def shard_units(model: nn.Module, class_names: list[str]) -> list[nn.Module]:
    """The modules sharded as units, innermost first: the named classes, else every built-in block, else a model
    of yours' repeated blocks (GPT2Block, BertLayer, a Block of yours: gradwise.memory.checkpointing)."""
    if class_names:
        chosen = [m for m in model.modules() if type(m).__name__ in set(class_names)]
        missing = sorted(set(class_names) - {type(m).__name__ for m in chosen})
        if missing:
            names = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"config error: train.shard_modules={missing} match no module "
                              f"(classes here: {', '.join(names)})")
        return chosen
    blocks = [block for stack in model.modules() if isinstance(stack, BlockStack) for block in stack]
    if blocks:
        return blocks
    repeated = set(repeated_blocks(model))
    return [m for m in model.modules() if type(m).__name__ in repeated]


class FSDPSync(DDPSync):
    """FSDP2 sharding over the torchrun process group (gloo on CPU, NCCL on CUDA). Every forward is a
    collective, so every rank scores the whole of each evaluation set."""

    shares_evaluation = False

    def __init__(self, ctx, reduce: bool = True):
        super().__init__(ctx, reduce, writer=Shards())

    def prepare(self, model: nn.Module, cfg, precision) -> nn.Module:
        from torch.distributed.fsdp import fully_shard  # a slow import, needed by FSDP alone

        check_batch_fits(cfg.train.batch_size, self.world_size)
        policy = precision.fsdp_policy()
        for unit in shard_units(model, cfg.train.shard_modules):
            fully_shard(unit, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    def micro_batch(self, forward_model: nn.Module, last: bool):
        forward_model.set_requires_gradient_sync(last and self.reduce)
        return contextlib.nullcontext()

    def local_gradients(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [local(p.grad) for p in params if p.grad is not None]

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor)

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        stateless = not optimizer.state  # (before any update) get_state_dict would give it a zero step's state
        model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards, keyed by name
        if stateless:
            optimizer.state.clear()
            optimizer_state["state"] = {}
        return model_state, optimizer_state

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any]) -> None:
        """A sharded checkpoint: each rank reads what its shards need (written by any number of processes);
        a one-file checkpoint (one process, DDP): every rank reads it whole and keeps its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if "shards" in payload:
            folder = Path(payload["shards"]["path"])
            payload["model_states"] = load_sharded(folder, model, optimizer, payload["shards"]["model_states"])
            return
        named = by_name(payload["optimizer"], model, optimizer)
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=named,
                       options=StateDictOptions(full_state_dict=True, strict=False))
        for name, p in model.named_parameters():  # a parameter the file has no state for keeps none (not the
            if name not in named["state"]:         # zero step's state the state-dict API gave it)
                optimizer.state.pop(p, None)
        payload["model_states"] = {name: shard_like(model, state)
                                   for name, state in payload.get("model_states", {}).items()}


def shard_like(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole model-shaped state dict split into this process's shards, placed as the model's own are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = model.state_dict()
    return {k: distribute_tensor(v.to(own[k].device), own[k].device_mesh, own[k].placements)
            if isinstance(own[k], DTensor) else v for k, v in full.items()}
