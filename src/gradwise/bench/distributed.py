"""Data parallel on this machine: throughput of 1 vs N processes, and the share of step time spent communicating.

Each measurement is a fresh torchrun group running `python -m gradwise.bench.distributed`
(the worker half of this module) on the default job with `train.batch_size`
as the global batch. A worker warms up, then times rounds of `steps` updates
through `Trainer.fit` itself, alternating rounds with and without DDP's
gradient all-reduce; 1 - (time without) / (time with) is the exposed
communication share. 1- and N-process groups alternate `repeats` times; ratios
are medians over those repeats.
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

PROCESSES = (1, 2)
WARMUP_STEPS = 20


def measure_group(nproc: int, steps: int, rounds: int, overrides: list[str]) -> dict[str, Any]:
    from gradwise.distributed.launch import LaunchOptions, launch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        status = launch(LaunchOptions(nproc=nproc), ["--out", str(out), "--steps", str(steps), "--rounds",
                                                     str(rounds), *overrides], module="gradwise.bench.distributed")
        if status != 0:
            raise RuntimeError(f"the {nproc}-process benchmark group failed (exit {status})")
        return json.loads(out.read_text())


def run(steps: int = 300, repeats: int = 5, overrides: list[str] | None = None) -> dict[str, Any]:
    overrides = list(overrides or [])
    groups: dict[int, list[dict[str, Any]]] = {n: [] for n in PROCESSES}
    for _ in range(max(1, repeats)):
        for n in PROCESSES:
            groups[n].append(measure_group(n, steps, rounds=2, overrides=overrides))
    base = [statistics.median(g["sync_s_per_step"]) for g in groups[1]]
    batch = groups[1][0]["global_batch"]
    rows = []
    for n in PROCESSES:
        sync = [statistics.median(g["sync_s_per_step"]) for g in groups[n]]
        speedups = sorted(b / s for b, s in zip(base, sync))
        row = {
            "processes": n,
            "global batch": batch,
            "ms/step": statistics.median(sync) * 1e3,
            "samples/s": batch / statistics.median(sync),
            "throughput vs 1 process": statistics.median(speedups),
            "range over repeats": f"{speedups[0]:.2f}..{speedups[-1]:.2f}",
        }
        if n > 1:
            nosync = [statistics.median(g["nosync_s_per_step"]) for g in groups[n]]
            shares = sorted(1 - q / s for q, s in zip(nosync, sync))
            row["communication share of step"] = statistics.median(shares)
            row["share range"] = f"{shares[0]:.2f}..{shares[-1]:.2f}"
        else:
            row["communication share of step"], row["share range"] = 0.0, "-"
        rows.append(row)
    return {"steps": steps, "repeats": repeats, "rows": rows, "raw": {str(n): g for n, g in groups.items()},
            "notes": ["Throughput counts global samples; the communication share is the step time DDP's all-reduce "
                      "adds (rounds with vs without it, same group)."]}


def worker(argv: list[str]) -> None:
    """One rank of a timing group (run by torchrun): warm up, then alternate synced and unsynced rounds."""
    from gradwise.config import load_config
    from gradwise.distributed.ddp import init_process_group
    from gradwise.train import Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    args, overrides = parser.parse_known_args(argv)

    ctx = init_process_group()
    dist = ctx if ctx.world_size > 1 else None
    cfg = load_config(None, ["log.progress=off", "log.plots=false", "diagnostics.every=0",
                             "train.eval_every=1000000000", "train.checkpoint_every=1000000000", *overrides])
    trainer = Trainer.from_config(cfg, dist=dist)
    trainer.test_data = trainer.val_data = None  # time training alone

    def timed(steps: int, sync: bool) -> float:
        trainer.sync_gradients = sync
        trainer.total_steps = trainer.step + steps
        t0 = time.perf_counter()
        trainer.fit()
        return (time.perf_counter() - t0) / steps

    timed(WARMUP_STEPS, True)
    result: dict[str, Any] = {"world_size": ctx.world_size, "global_batch": cfg.train.batch_size,
                              "sync_s_per_step": [], "nosync_s_per_step": []}
    for _ in range(args.rounds):
        result["sync_s_per_step"].append(timed(args.steps, True))
        if dist is not None:
            result["nosync_s_per_step"].append(timed(args.steps, False))
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(result))
    ctx.finish()


if __name__ == "__main__":
    worker(sys.argv[1:])
