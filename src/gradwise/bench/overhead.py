"""Trainer overhead: gradwise `Trainer.fit` vs a plain hand-written PyTorch loop.

Same model (one initial state copied into both), data, optimizer and
schedule; no evaluation in either. Each round times both, alternating which
goes first; the headline figure is the median of the per-round ratios (the two
runs of a round share the machine's momentary speed), with the lowest and
highest round ratio beside it. Two jobs: the default config, and a tiny MLP
whose step is so cheap that the trainer's per-step bookkeeping dominates.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from gradwise.config import load_config
from gradwise.data import build_data
from gradwise.nn import build_model
from gradwise.optim import build_optimizer, build_scheduler
from gradwise.train import Trainer, seed_everything

JOBS = {
    "default config (CNN, MNIST-1D, batch 128)": [],
    "tiny MLP (width 16, batch 32)": ["model.name=mlp", "model.depth=1", "model.width=16", "train.batch_size=32"],
}


def plain_loop(model, x, y, cfg, steps: int) -> None:
    """The loop a user would write by hand: shuffled batches, zero_grad, forward, backward, step."""
    opt = build_optimizer(cfg.optim, model)
    sched = build_scheduler(cfg.schedule, opt, steps)
    n, bs = len(y), cfg.train.batch_size
    per_epoch = -(-n // bs)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(steps):
        b = step % per_epoch
        if b == 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[b * bs : (b + 1) * bs]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()


def measure(overrides: list[str], steps: int, repeats: int) -> dict[str, Any]:
    cfg = load_config(None, [f"train.steps={steps}", "log.progress=off", *overrides])
    seed_everything(cfg.seed)
    data = build_data(cfg.data)
    initial = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    x, y = data.train.tensors

    def time_plain() -> float:
        model = copy.deepcopy(initial)
        t0 = time.perf_counter()
        plain_loop(model, x, y, cfg, steps)
        return (time.perf_counter() - t0) / steps

    def time_trainer() -> float:
        trainer = Trainer(copy.deepcopy(initial), data.train, test_data=None, config=cfg, task=data.task)
        t0 = time.perf_counter()
        trainer.fit()
        return (time.perf_counter() - t0) / steps

    time_plain(), time_trainer()  # warm-up
    plain_times, trainer_times = [], []
    for round_index in range(repeats):
        if round_index % 2 == 0:
            plain_times.append(time_plain())
            trainer_times.append(time_trainer())
        else:
            trainer_times.append(time_trainer())
            plain_times.append(time_plain())
    ratios = sorted(t / p for t, p in zip(trainer_times, plain_times))
    return {"plain_s_per_step": plain_times, "trainer_s_per_step": trainer_times, "ratio": statistics.median(ratios),
            "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def run(steps: int = 300, repeats: int = 5) -> dict[str, Any]:
    rows, raw = [], {}
    for job, overrides in JOBS.items():
        m = measure(overrides, steps, repeats)
        raw[job] = m
        plain, ours = statistics.median(m["plain_s_per_step"]), statistics.median(m["trainer_s_per_step"])
        rows.append({
            "job": job,
            "plain ms/step": plain * 1e3,
            "gradwise ms/step": ours * 1e3,
            "ratio gradwise/plain (median of rounds)": m["ratio"],
            "overhead %": (m["ratio"] - 1) * 100,
            "round ratios": f"{m['ratio_min']:.3f}..{m['ratio_max']:.3f}",
        })
    return {"steps": steps, "repeats": repeats, "rows": rows, "raw": raw}
