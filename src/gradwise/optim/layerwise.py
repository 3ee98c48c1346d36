"""Shared pieces of the layer-wise adaptive optimizers (LARS, LAMB): the trust ratio
as a pure, vectorised function, fp32 views of possibly low-precision tensors, and
cache-sized chunking.

On CPU, `torch._foreach_*` runs one kernel per tensor without fusion, so an
op-at-a-time sweep over all tensors streams the whole state through memory once
per op. Running the op sequence over chunks of tensors that fit in cache keeps
the vectorised dispatch and gains the locality of a per-tensor loop. Chunks are
independent, so they run on a small thread pool (torch ops release the GIL):
most parameter tensors are below ATen's intra-op parallel grain, and a
sequential sweep leaves all but one core idle. Results are bit-identical to a
sequential sweep. On CUDA the fused multi-tensor kernels want one chunk.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


def trust_ratios(
    numerators: torch.Tensor,
    denominators: torch.Tensor,
    coefficient: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """coefficient * num / den per tensor, 1 where either norm is 0; at most `clip` when given.

    All inputs are 1-D tensors of per-tensor norms; no host synchronisation.
    """
    ratio = torch.where(
        (numerators > 0) & (denominators > 0),
        coefficient * numerators / denominators.clamp(min=torch.finfo(denominators.dtype).tiny),
        torch.ones_like(numerators),
    )
    if clip is not None:
        ratio = ratio.clamp(max=clip)
    return ratio


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (FSDP's sharded parameters). No DTensor exists until torch.distributed.tensor
    is imported, so this never imports it (that import alone takes most of a second)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded, DTensor) tensor: the tensor itself when not sharded.
    In-place ops on it update the DTensor."""
    return t.to_local() if is_sharded(t) else t


def shard_reduction(params: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For sharded parameters (DTensors: FSDP), a function that sums a per-process partial over their mesh's
    processes (one all-reduce); None for whole tensors."""
    if not params or not is_sharded(params[0]):
        return None
    import torch.distributed as dist  # only reached when a DTensor exists: torch.distributed is loaded already

    group = params[0].device_mesh.get_group()

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t

    return reduce


def as_fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors themselves when fp32, else fp32 copies (never modifies the originals)."""
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors)) if tensors else torch.zeros(0)


def write_back(params: list[torch.Tensor], params32: list[torch.Tensor]) -> None:
    """Copy updated fp32 copies into low-precision parameters (fp32 ones were updated in place)."""
    for p, p32 in zip(params, params32):
        if p is not p32:
            p.copy_(p32)


CPU_CHUNK_BYTES = 1 << 20  # best of 0.5, 1, 2, 4 MiB with concurrent chunks on this 2-core EPYC (paired A/B)


def chunks(tensors: list[torch.Tensor], max_bytes: int | None) -> list[list[torch.Tensor]]:
    """Split `tensors` into consecutive runs of at most `max_bytes` of fp32 data (None: one run)."""
    if max_bytes is None:
        return [tensors]
    runs, current, size = [], [], 0
    for t in tensors:
        nbytes = t.numel() * 4
        if current and size + nbytes > max_bytes:
            runs.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        runs.append(current)
    return runs


def chunk_bytes(device: torch.device) -> int | None:
    return CPU_CHUNK_BYTES if device.type == "cpu" else None


CONCURRENT_CHUNKS = True  # False: chunks run one after another (same results, for debugging)
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (owning pid, pool): a forked child makes its own


def _chunk_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        pool = ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="gradwise-optim")
        _pool = (os.getpid(), pool)
    return _pool[1]


def for_each_chunk(params: list[torch.Tensor], update: Callable[[list[torch.Tensor]], None]) -> None:
    """Call `update(run)` for each cache-sized run of `params`, concurrently on CPU when it pays."""
    runs = chunks(params, chunk_bytes(params[0].device))
    if len(runs) == 1 or not CONCURRENT_CHUNKS or torch.get_num_threads() == 1:
        for run in runs:
            update(run)
        return

    def work(run: list[torch.Tensor]) -> None:
        with torch.no_grad():  # grad mode is per thread
            update(run)

    for future in [_chunk_pool().submit(work, run) for run in runs]:
        future.result()  # re-raises a worker's exception here


class LayerwiseOptimizer(torch.optim.Optimizer):
    """What LARS and LAMB share: closure handling, the walk over groups with gradients, and whole-tensor norms.

    Under sharding (FSDP: parameters are DTensors) the update runs on each process's local shards and
    `shard_sum` (found at each step from the parameters themselves: `shard_reduction`) adds the shards'
    squared norms up, all tensors' at once in one reduction, so each trust ratio is the unsharded tensor's.
    """

    shard_sum: Callable[[torch.Tensor], torch.Tensor] | None = None  # this step's; None: whole tensors

    def tensor_norms(self, *lists: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-tensor L2 norms of each list of (local) tensors, over whole tensors: one reduction for all."""
        if self.shard_sum is None:
            return [norms(ts) for ts in lists]
        squares = self.shard_sum(torch.cat([norms(ts).square() for ts in lists]))
        return list(squares.sqrt().split([len(ts) for ts in lists]))

    def for_each_run(self, params: list[torch.Tensor], update: Callable[[list[torch.Tensor]], None]) -> None:
        """`update` over cache-sized chunks; sharded, over all of them at once (one norm reduction)."""
        if self.shard_sum is not None:
            update(params)
        else:
            for_each_chunk(params, update)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.shard_sum = shard_reduction([p for group in self.param_groups for p in group["params"]])
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(params, group)
        return loss

    def _step_group(self, params: list[torch.Tensor], group: dict) -> None:
        raise NotImplementedError
