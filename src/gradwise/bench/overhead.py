"""Trainer overhead: gradwise `Trainer.fit` vs a plain hand-written PyTorch loop.

Same model (one initial state copied into both), data, optimizer and
schedule; no evaluation in either. Each round times both, alternating which
goes first; the headline figure is the median of the per-round ratios (the two
runs of a round share the machine's momentary speed), with the lowest and
highest round ratio beside it. Two jobs: the default config, and a tiny MLP
whose step is so cheap that the trainer's per-step bookkeeping dominates.

When `lightning` is installed (the `bench` extra), PyTorch Lightning's Trainer
runs the same job in the same rounds: the same model state, optimizer and
schedule, batches fetched by index as whole tensors (no per-sample collation),
no logger, checkpointing, progress bar or model summary.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

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


def lightning_fit(model, x, y, cfg, steps: int) -> None:
    """The same job under Lightning's Trainer (imported only here: a benchmark peer)."""
    import lightning as L

    class Batches(Dataset):  # index a whole batch at once, like the other two loops
        def __len__(self):
            return len(y)

        def __getitem__(self, idx):
            return x[idx], y[idx]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _index):
            inputs, targets = batch
            return F.cross_entropy(self.net(inputs), targets)

        def configure_optimizers(self):
            opt = build_optimizer(cfg.optim, self.net)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": build_scheduler(cfg.schedule, opt, steps),
                                                       "interval": "step"}}

    sampler = BatchSampler(RandomSampler(range(len(y)), generator=torch.Generator().manual_seed(cfg.seed)),
                           cfg.train.batch_size, drop_last=False)
    loader = DataLoader(Batches(), sampler=sampler, batch_size=None)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():  # Lightning's own deprecation notices about torch internals
        warnings.simplefilter("ignore")
        trainer.fit(Module(), loader)


def lightning_available() -> bool:
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    return True


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

    def time_lightning() -> float:
        model = copy.deepcopy(initial)
        t0 = time.perf_counter()
        lightning_fit(model, x, y, cfg, steps)
        return (time.perf_counter() - t0) / steps

    timers = {"plain": time_plain, "trainer": time_trainer}
    if lightning_available():
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        timers["lightning"] = time_lightning
    for timer in timers.values():
        timer()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in timers}
    for round_index in range(repeats):
        order = list(timers) if round_index % 2 == 0 else list(reversed(timers))
        for name in order:
            times[name].append(timers[name]())
    ratios = sorted(t / p for t, p in zip(times["trainer"], times["plain"]))
    extra = statistics.median(t - p for t, p in zip(times["trainer"], times["plain"]))
    result = {"plain_s_per_step": times["plain"], "trainer_s_per_step": times["trainer"],
              "ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
              "extra_s_per_step": extra}
    if "lightning" in times:
        result["lightning_s_per_step"] = times["lightning"]
        result["lightning_ratio"] = statistics.median(lt / p for lt, p in zip(times["lightning"], times["plain"]))
        result["trainer_over_lightning"] = statistics.median(
            t / lt for t, lt in zip(times["trainer"], times["lightning"]))
    return result


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
            "extra us/step (median of rounds)": m["extra_s_per_step"] * 1e6,
            "round ratios": f"{m['ratio_min']:.3f}..{m['ratio_max']:.3f}",
            "lightning ms/step": statistics.median(m["lightning_s_per_step"]) * 1e3 if "lightning_ratio" in m else "-",
            "lightning/plain": m.get("lightning_ratio", "-"),
            "gradwise/lightning": m.get("trainer_over_lightning", "-"),
        })
    return {"steps": steps, "repeats": repeats, "rows": rows, "raw": raw}
