"""Memory measurement on any device.

- `ActivationMeter`: bytes of activations held for backward during one forward,
  from saved-tensor hooks (each storage counted once, parameters excluded: under
  FSDP also the whole weights it gathers for a block and frees after), plus
  the inputs that checkpointed regions keep for their recompute (checkpoint
  installs its own hooks inside a region, so those are reported by
  `note_kept`).
- `state_bytes`: parameters, gradients and optimizer state (sharded tensors: this
  process's shards).
- On CUDA, `cuda_peak` reads the allocator's peak.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

_active: list["ActivationMeter"] = []


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's (DTensor's) shard on this process; any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    t = _local(t)
    return (str(t.device), t.untyped_storage().data_ptr())


class ActivationMeter:
    """Counts unique storages saved for backward while active. `model`'s parameters are no activations: those it
    holds when the meter starts, and under FSDP the whole weights it gathers for a block while the block runs
    (registered on the module then; freed after)."""

    def __init__(self, model: nn.Module | None = None):
        self._model = model
        self._exclude = {_storage_key(p) for p in model.parameters()} if model is not None else set()
        self._sharded = model is not None and any(hasattr(p, "to_local") for p in model.parameters())
        self._seen: dict[tuple[str, int], int] = {}

    def _record(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = _storage_key(t)
        if key in self._exclude or key in self._seen:
            return
        if self._sharded and key in {_storage_key(p) for p in self._model.parameters()}:  # gathered weights
            return
        self._seen[key] = t.untyped_storage().nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._record(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @contextlib.contextmanager
    def track(self) -> Iterator["ActivationMeter"]:
        _active.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            _active.remove(self)


def note_kept(t: torch.Tensor) -> None:
    """Report a tensor a checkpointed region keeps for its recompute (no-op when no meter is active)."""
    for meter in _active:
        meter._record(t)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            t = _local(t)
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, their gradients, and the optimizer's state tensors."""
    params = list(model.parameters())
    opt_tensors = []
    if optimizer is not None:
        for state in optimizer.state.values():
            opt_tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return {
        "params": tensor_bytes(params),
        "grads": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer_state": tensor_bytes(opt_tensors),
    }


def cuda_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
