"""Which gradient-sync strategy this process runs: one process, or the torchrun group's DDP or FSDP."""

from __future__ import annotations

import atexit
import datetime
import os

import torch.distributed as dist

from gradwise.parallel.ddp import DDPSync, DistContext, init_process_group, launched_by_torchrun
from gradwise.parallel.fsdp import FSDPSync
from gradwise.parallel.strategy import GradientSync, SingleProcess


def environment_sync(strategy: str = "ddp") -> GradientSync:
    """The strategy this process's environment asks for: when torchrun started it in a group of more than
    one (the process group is joined here), `DDPSync`, or `FSDPSync` for `strategy="fsdp"`
    (`train.strategy`); else one process. So a user's script that builds a Trainer trains data-parallel
    under `torchrun --nproc-per-node N script.py` with no extra code."""
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        joined = not dist.is_initialized()
        sync = group_sync(init_process_group(), strategy)
        if joined:  # leave the group before interpreter teardown (gloo's threads must not outlive it)
            atexit.register(leave_group)
        return sync
    return SingleProcess()


def leave_group(timeout_s: float = 60.0) -> None:
    """Wait for every rank (at most `timeout_s`: a rank that failed never comes), then destroy the group. A
    rank that exits while a peer's gloo threads still wait on it aborts that peer ("terminate called without
    an active exception")."""
    if not dist.is_initialized():  # the script left the group itself
        return
    if dist.get_backend() == "gloo":  # (NCCL has no barrier with a timeout; it is left as before)
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError:
            pass  # a rank did not come: leave anyway
    dist.destroy_process_group()


def group_sync(ctx: DistContext, strategy: str = "ddp") -> DDPSync:
    """The multi-process strategy `train.strategy` names, over the group `ctx` describes."""
    return FSDPSync(ctx) if strategy == "fsdp" else DDPSync(ctx)
