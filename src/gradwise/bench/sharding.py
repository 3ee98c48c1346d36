"""DDP vs FSDP: per-rank memory of parameters + gradients + optimizer state, and step time, at N = 1, 2, 4.

Part of `gradwise bench distributed`. Each cell is a fresh torchrun group running this module's worker
on the default job (`train.strategy` = ddp or fsdp). After warm-up steps, a rank counts the bytes of the
tensors it actually holds (parameters, `.grad`s and optimizer state, each storage once; under FSDP the
local shards, after the step has freed the gathered copies), then times `steps` updates through
`Trainer.fit`. N = 1 runs one process with no strategy (the baseline both are divided by).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gradwise.config import load_config
from gradwise.launch import LaunchOptions, launch
from gradwise.parallel.ddp import init_process_group
from gradwise.parallel.environment import group_sync
from gradwise.train import Trainer

COUNTS = (1, 2, 4)
WARMUP_STEPS = 3


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def state_tensors(optimizer: torch.optim.Optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def measure(nproc: int, parallel: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cell.json"
        status = launch(LaunchOptions(nproc=nproc), ["--out", str(out), "--steps", str(steps),
                                                     f"train.strategy={parallel}", *overrides],
                        module="gradwise.bench.sharding")
        if status != 0:
            raise RuntimeError(f"the {nproc}-process {parallel} group failed (exit {status})")
        return json.loads(out.read_text())


def rows(steps: int, repeats: int, overrides: list[str] | None = None,
         counts: tuple[int, ...] = COUNTS) -> list[dict[str, Any]]:
    overrides = list(overrides or [])
    cells = {(n, p): [] for n in counts for p in ("ddp", "fsdp") if n > 1 or p == "ddp"}
    for _ in range(max(1, repeats)):
        for n, p in cells:  # alternating, so drifts of the machine hit every cell alike
            cells[(n, p)].append(measure(n, p, steps, overrides))
    base = cells[(1, "ddp")]
    base_bytes = base[0]["bytes"]["total"]
    table = []
    for (n, p), runs in cells.items():
        b = max(r["bytes"]["total"] for r in runs)  # the largest rank's
        table.append({
            "processes": n, "strategy": "one process" if n == 1 else p,
            "params MiB/rank": runs[0]["bytes"]["params"] / 2**20, "grads MiB/rank": runs[0]["bytes"]["grads"] / 2**20,
            "optimizer MiB/rank": runs[0]["bytes"]["optimizer"] / 2**20,
            "total vs one process": b / base_bytes, "target (1/N + 10%)": (1 / n + 0.1) if p == "fsdp" else "-",
            "ms/step": statistics.median(r["s_per_step"] for r in runs) * 1e3,
        })
    return table


def worker(argv: list[str]) -> None:
    """One rank of a measuring group (run by torchrun)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    args, overrides = parser.parse_known_args(argv)
    ctx = init_process_group()
    cfg = load_config(None, ["log.progress=off", "log.plots=false", "diagnostics.every=0",
                             "train.eval_every=null", "train.checkpoint_every=null", *overrides])
    sync = group_sync(ctx, cfg.train.strategy) if ctx.world_size > 1 else None
    trainer = Trainer.from_config(cfg, sync=sync)
    trainer.data["val"] = trainer.data["test"] = None  # time training alone
    trainer.fit(max_steps=WARMUP_STEPS)
    engine = trainer.engine
    mine = {"params": held_bytes(engine.params), "grads": held_bytes([p.grad for p in engine.params
                                                                        if p.grad is not None]),
            "optimizer": held_bytes(state_tensors(engine.optimizer))}
    mine["total"] = sum(mine.values())
    t0 = time.perf_counter()
    trainer.fit(max_steps=WARMUP_STEPS + args.steps)
    elapsed = (time.perf_counter() - t0) / args.steps
    ranks = trainer.sync.rank_states(mine) or [mine]
    if ctx.is_main:
        largest = max(ranks, key=lambda r: r["total"])
        Path(args.out).write_text(json.dumps({"bytes": largest, "ranks": ranks, "s_per_step": elapsed}))
    ctx.finish()


if __name__ == "__main__":
    worker(sys.argv[1:])
