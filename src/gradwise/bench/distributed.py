"""Data parallel on this machine: throughput of 1 vs N processes, and the share of step time spent communicating.

Each measurement is a fresh torchrun group running `python -m gradwise.bench.distributed`
(the worker half of this module) on the default job with `train.batch_size`
as the global batch. A worker warms up, then times rounds of `steps` updates
through `Trainer.fit` itself, alternating rounds with and without DDP's
gradient all-reduce; 1 - (time without) / (time with) is the exposed
communication share. 1- and N-process groups alternate `repeats` times; ratios
are medians over those repeats.

Then DDP vs FSDP (gradwise.bench.sharding): per-rank memory and step time at N = 1, 2, 4.

Then synchronous vs asynchronous with a straggler, on the Ray parameter server
(when Ray is installed): 4 workers, worker 3 three times slower, the same number
of gradient computations under SSGD (every update waits for the straggler) and
ASGD (nobody waits); the figure is wall time per gradient, SSGD over ASGD.
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

from gradwise.bench.sharding import rows as sharding_rows
from gradwise.config import load_config
from gradwise.data import build_data
from gradwise.launch import LaunchOptions, launch
from gradwise.nn import build_model
from gradwise.parallel.ddp import DDPSync, init_process_group
from gradwise.train import Trainer, seed_everything

PROCESSES = (1, 2)
WARMUP_STEPS = 20


def measure_group(nproc: int, steps: int, rounds: int, overrides: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        status = launch(LaunchOptions(nproc=nproc), ["--out", str(out), "--steps", str(steps), "--rounds",
                                                     str(rounds), *overrides], module="gradwise.bench.distributed")
        if status != 0:
            raise RuntimeError(f"the {nproc}-process benchmark group failed (exit {status})")
        return json.loads(out.read_text())


def run(steps: int = 300, repeats: int = 5, overrides: list[str] | None = None,
        sharding_counts: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
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
    notes = ["Throughput counts global samples; the communication share is the step time DDP's all-reduce "
             "adds (rounds with vs without it, same group)."]
    straggler = straggler_rows(gradients=max(40, min(2 * steps, 400)), repeats=max(1, repeats // 3),
                               overrides=overrides)
    if straggler is None:
        notes.append("sync vs async with a straggler: skipped (Ray not installed; pip install 'gradwise[async]')")
    else:
        rows.extend(straggler["rows"])

    memory = sharding_rows(steps=max(5, steps // 20), repeats=max(1, repeats // 3), overrides=overrides,
                           counts=sharding_counts)
    notes.append("DDP vs FSDP: bytes of the parameters, gradients and optimizer state each rank holds after a "
                 "step (the largest rank's, counted from the live tensors), and ms per step, N processes on "
                 "this machine's cores (gradwise.bench.sharding).")
    return {"steps": steps, "repeats": repeats, "rows": rows, "raw": {str(n): g for n, g in groups.items()},
            "straggler": straggler, "notes": notes, "tables": {"DDP vs FSDP, per rank": memory}}


STRAGGLER = {"workers": 4, "slowdown": "3:3"}


def straggler_rows(gradients: int, repeats: int, overrides: list[str] = ()) -> dict[str, Any] | None:
    """SSGD vs ASGD wall time per gradient with one slow worker, on the job `overrides` describe (None without
    Ray)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    from gradwise.asynchronous.ps import ray_instance, train_async

    times: dict[str, list[float]] = {"ssgd": [], "asgd": []}
    runs = [rule for _ in range(repeats) for rule in times]
    with ray_instance():  # one Ray instance for every run
        for rule in runs:
            cfg = load_config(None, [f"ps.rule={rule}", f"ps.slowdown={STRAGGLER['slowdown']}",
                                     f"train.steps={gradients}", "log.progress=off", "log.plots=false",
                                     "diagnostics.every=0", "train.eval_every=null", *overrides])
            summary = train_async(cfg, STRAGGLER["workers"], None, progress="off")
            times[rule].append(summary["wall_seconds"] / gradients)
    ratio = statistics.median(s / a for s, a in zip(times["ssgd"], times["asgd"]))
    base = {"global batch": f"{STRAGGLER['workers']} x 128", "range over repeats": "-",
            "communication share of step": "-", "share range": "-"}
    rows = [{"processes": f"SSGD, {STRAGGLER['workers']} Ray workers, worker 3 3x slower", **base,
             "ms/step": statistics.median(times["ssgd"]) * 1e3, "samples/s": 128 / statistics.median(times["ssgd"]),
             "throughput vs 1 process": "-"},
            {"processes": f"ASGD, same straggler (SSGD time / ASGD time = {ratio:.2f})", **base,
             "ms/step": statistics.median(times["asgd"]) * 1e3, "samples/s": 128 / statistics.median(times["asgd"]),
             "throughput vs 1 process": "-"}]
    return {"gradients": gradients, "times_s_per_gradient": times, "ssgd_over_asgd": ratio, "rows": rows}


def worker(argv: list[str]) -> None:
    """One rank of a timing group (run by torchrun): warm up, then alternate synced and unsynced rounds."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    args, overrides = parser.parse_known_args(argv)

    ctx = init_process_group()
    sync = DDPSync(ctx) if ctx.world_size > 1 else None
    cfg = load_config(None, ["log.progress=off", "log.plots=false", "diagnostics.every=0",
                             "train.eval_every=null", "train.checkpoint_every=null", *overrides])
    seed_everything(cfg.seed)
    data = build_data(cfg.data, context=cfg.model.context)
    model = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    trainer = Trainer(model, data.train, config=cfg, task=data.task, sync=sync)  # no test set: time training alone

    def timed(steps: int, reduce: bool) -> float:
        if sync is not None:
            sync.reduce = reduce
        t0 = time.perf_counter()
        trainer.fit(max_steps=trainer.state.step + steps)
        return (time.perf_counter() - t0) / steps

    timed(WARMUP_STEPS, True)
    result: dict[str, Any] = {"world_size": ctx.world_size, "global_batch": cfg.train.batch_size,
                              "sync_s_per_step": [], "nosync_s_per_step": []}
    for _ in range(args.rounds):
        result["sync_s_per_step"].append(timed(args.steps, True))
        if sync is not None:
            result["nosync_s_per_step"].append(timed(args.steps, False))
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(result))
    ctx.finish()


if __name__ == "__main__":
    worker(sys.argv[1:])
