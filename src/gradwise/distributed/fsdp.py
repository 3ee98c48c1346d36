"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`): each process keeps 1/N of the
parameters, gradients and optimizer state.

The batch is shared exactly as under DDP (`DDPSync`: the same rows per rank, the same loss weights, since
FSDP's reduce-scatter averages gradients over ranks as DDP's all-reduce does). What differs:

- `prepare` wraps each block (a `BlockStack` entry of a built-in model, or the classes named in
  `train.shard_modules`) and then the root with `fully_shard`; parameters become DTensors sharded on dim 0.
  Under `precision=bf16` the blocks compute in bf16 (`MixedPrecisionPolicy(param_dtype=bf16)`) while the
  sharded master parameters, the gradient reduction and the optimizer state stay fp32.
- `micro_batch` turns the reduce-scatter off on every micro-batch but the last (`set_requires_gradient_sync`).
- `shard_sum` adds a tensor over the shards (one all-reduce): the whole-tensor norms LARS/LAMB need, the
  global gradient norm, the finiteness flag.
- checkpoints hold the full (unsharded) state, gathered by torch.distributed.checkpoint's state-dict API
  and stored in torch's own formats (the optimizer's state keyed by parameter index, as
  `optimizer.state_dict()` keys it), so a run resumes on any number of processes, and under any strategy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gradwise.distributed.ddp import DDPSync
from gradwise.errors import ConfigError


def shard_units(model: nn.Module, class_names: list[str]) -> list[nn.Module]:
    """The modules sharded as units, innermost first: the named classes, else every built-in block."""
    from gradwise.nn.blocks import BlockStack

    if class_names:
        chosen = [m for m in model.modules() if type(m).__name__ in set(class_names)]
        missing = sorted(set(class_names) - {type(m).__name__ for m in chosen})
        if missing:
            names = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"config error: train.shard_modules={missing} match no module "
                              f"(classes here: {', '.join(names)})")
        return chosen
    return [block for stack in model.modules() if isinstance(stack, BlockStack) for block in stack]


class FSDPSync(DDPSync):
    """FSDP2 sharding over the torchrun process group (gloo on CPU, NCCL on CUDA)."""

    sharded = True

    def prepare(self, model: nn.Module, cfg) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if cfg.train.batch_size < self.world_size:
            raise ConfigError(f"config error: train.batch_size={cfg.train.batch_size} is smaller than the "
                              f"{self.world_size} processes; each process needs at least one sample")
        if cfg.master_weights == "fp16":
            raise ConfigError("config error: master_weights=fp16 is not supported with train.parallel=fsdp "
                              "(FSDP keeps fp32 master shards); use precision=bf16 or fp16 with fp32 masters")
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.precision == "bf16" else MixedPrecisionPolicy()
        for unit in shard_units(model, cfg.train.shard_modules):
            fully_shard(unit, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    def micro_batch(self, forward_model: nn.Module, last: bool):
        forward_model.set_requires_gradient_sync(last and self.reduce)
        return contextlib.nullcontext()

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce_sum(tensor)

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, by_name = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return model_state, _by_index(by_name)

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                         optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=_by_name(optimizer_state, model, optimizer),
                       options=StateDictOptions(full_state_dict=True))


def _by_index(state: dict) -> dict:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) keyed by index instead
    (`optimizer.state_dict()`'s: parameters numbered in param-group order)."""
    if "param_groups" not in state:  # ranks other than 0 get nothing (rank 0 alone writes the checkpoint)
        return state
    index, groups = {}, []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of `_by_index`, numbering this optimizer's parameters in its param-group order."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
