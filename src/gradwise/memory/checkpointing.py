"""Activation checkpointing on `torch.utils.checkpoint` (use_reentrant=False, RNG preserved).

Built-in models run their blocks through a `BlockStack` (gradwise.nn.blocks), a `CheckpointedSegments`;
a policy sets how many consecutive blocks form one checkpointed segment:

    none      nothing recomputed
    all       every block is its own segment (block inputs kept, insides recomputed)
    every:K   segments of K blocks
    sqrt      segments of ceil(sqrt(n)) blocks: O(sqrt n) kept activations for one
              extra forward (Chen et al. 2016)

For a user's own model, `memory.modules=[ClassName, ...]` checkpoints every
module of those classes individually, without changing its state_dict keys (a
Hugging Face model's `config.use_cache` is switched off, as transformers' own
gradient checkpointing does: a recomputed block would write its KV cache twice).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradwise.errors import ConfigError
from gradwise.memory import measure


def _run_segment(blocks: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        h = block(h)
    return h


class CheckpointedSegments(nn.ModuleList):
    """Modules applied in order, in checkpointed segments of `segment` modules (0: none; `apply_checkpointing`
    sets it)."""

    segment: int = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        if self.segment == 0 or not torch.is_grad_enabled():
            return _run_segment(blocks, h)
        for start in range(0, len(blocks), self.segment):
            measure.note_kept(h)  # the segment input is held until backward
            h = checkpoint(_run_segment, blocks[start : start + self.segment], h, use_reentrant=False)
        return h


def segment_size(policy: str, n_blocks: int) -> int:
    """Blocks per checkpointed segment for `policy` (0 = no checkpointing)."""
    if policy == "none" or n_blocks == 0:
        return 0
    if policy == "all":
        return 1
    if policy == "sqrt":
        return max(1, math.ceil(math.sqrt(n_blocks)))
    return int(policy.split(":", 1)[1])


_CHECKPOINTED: dict[type, type] = {}


def checkpointed_class(cls: type) -> type:
    """A subclass of `cls` (same name) whose forward runs under torch.utils.checkpoint.

    Swapping an instance's class keeps its state_dict keys, and unlike patching
    `forward` on the instance it survives `copy.deepcopy` (the copy computes with
    its own parameters).
    """
    if getattr(cls, "_gradwise_checkpointed", False):
        return cls
    if cls not in _CHECKPOINTED:

        def forward(self, *args, **kwargs):
            if not torch.is_grad_enabled():
                return cls.forward(self, *args, **kwargs)
            for a in args:
                if isinstance(a, torch.Tensor):
                    measure.note_kept(a)
            return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

        _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {
            "forward": forward, "_gradwise_checkpointed": True, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        })
    return _CHECKPOINTED[cls]


def repeated_blocks(model: nn.Module) -> list[str]:
    """The class names of `model`'s repeated blocks, the outermost ones: a ModuleList or Sequential holding two
    or more modules of one class that have parameters and submodules of their own (GPT2Block in
    `transformer.h`, BertLayer in `encoder.layer`, a user's Block; never a bare Linear). Searched top-down, in
    module order; a repeated block's insides are not searched."""
    found: list[str] = []

    def is_block(module: nn.Module) -> bool:
        return any(True for _ in module.children()) and any(True for _ in module.parameters())

    def search(module: nn.Module) -> None:
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            counts: dict[type, int] = {}
            for child in module.children():
                if is_block(child):
                    counts[type(child)] = counts.get(type(child), 0) + 1
            repeated = [cls for cls, n in counts.items() if n >= 2]
            found.extend(cls.__name__ for cls in repeated if cls.__name__ not in found)
            for child in module.children():
                if type(child) not in repeated:
                    search(child)
            return
        for child in module.children():
            search(child)

    search(model)
    return found


def apply_checkpointing(model: nn.Module, policy: str, module_names: list[str] | None = None) -> int:
    """Configure checkpointing on `model`; returns how many regions are checkpointed."""
    if module_names:
        chosen = [m for m in model.modules() if type(m).__name__ in set(module_names)]
        found = {type(m).__name__ for m in chosen}
        missing = [n for n in module_names if n not in found]
        if missing:
            names = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"config error: memory.modules={missing} match no module (classes here: "
                              f"{', '.join(names)})")
        for m in chosen:
            m.__class__ = checkpointed_class(type(m))
        hf_config = getattr(model, "config", None)
        if getattr(hf_config, "use_cache", False):  # a Hugging Face model's KV cache would be written again when
            hf_config.use_cache = False  # a block is recomputed (as transformers' own checkpointing, it goes off)
        return len(chosen)
    stacks = [m for m in model.modules() if isinstance(m, CheckpointedSegments)]
    if policy == "none":
        for stack in stacks:
            stack.segment = 0
        return 0
    if not stacks:
        raise ConfigError(
            f"config error: memory.checkpoint={policy} needs a model built from gradwise blocks; "
            f"for your own model set memory.modules=[ClassName, ...]"
        )
    regions = 0
    for stack in stacks:
        stack.segment = segment_size(policy, len(stack))
        regions += math.ceil(len(stack) / stack.segment) if stack.segment else 0
    return regions
