"""Trainer overhead: gradwise `Trainer.fit` vs a plain hand-written PyTorch loop.

Same model (one initial state copied into both), data, optimizer and
schedule; no evaluation in either. Runs alternate plain/trainer for `repeats`
rounds; the headline figure is the median of the per-round ratios (the two
runs of a round share the machine's momentary speed), with the lowest and
highest round ratio beside it.
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


def run(steps: int = 300, repeats: int = 5, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(None, [f"train.steps={steps}", "log.progress=off", *(overrides or [])])
    seed_everything(cfg.seed)
    data = build_data(cfg.data)
    initial = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    x, y = data.train.tensors
    plain_times, trainer_times = [], []
    # one untimed warm-up of each path
    for timed in [False] + [True] * repeats:
        model = copy.deepcopy(initial)
        t0 = time.perf_counter()
        plain_loop(model, x, y, cfg, steps)
        t_plain = time.perf_counter() - t0
        trainer = Trainer(copy.deepcopy(initial), data.train, test_data=None, config=cfg, task=data.task)
        t0 = time.perf_counter()
        trainer.fit()
        t_trainer = time.perf_counter() - t0
        if timed:
            plain_times.append(t_plain / steps)
            trainer_times.append(t_trainer / steps)
    plain, ours = statistics.median(plain_times), statistics.median(trainer_times)
    ratios = sorted(t / p for t, p in zip(trainer_times, plain_times))
    ratio = statistics.median(ratios)
    return {
        "config": "default (CNN on MNIST-1D, batch %d)" % cfg.train.batch_size,
        "steps": steps,
        "repeats": repeats,
        "plain_ms_per_step": plain_times,
        "trainer_ms_per_step": trainer_times,
        "rows": [
            {
                "job": "default config",
                "plain loop ms/step": plain * 1e3,
                "gradwise ms/step": ours * 1e3,
                "ratio (gradwise/plain, median of rounds)": ratio,
                "overhead %": (ratio - 1) * 100,
                "round ratios min..max": f"{ratios[0]:.3f}..{ratios[-1]:.3f}",
            }
        ],
        "notes": [f"per-repeat ms/step plain={[round(t*1e3, 3) for t in plain_times]} "
                  f"gradwise={[round(t*1e3, 3) for t in trainer_times]}"],
    }
