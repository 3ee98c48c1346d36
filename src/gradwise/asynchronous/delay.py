"""The delay simulator (`--strategy simulate --workers M`): asynchronous training's staleness in one process.

Each step computes one gradient on the weights as they were tau updates earlier, then applies it to the
current weights through the `ps.rule` (gradwise.optim.async_rules) and the step engine's `update`,
as the parameter server does with a pushed gradient. tau comes from `ps.delay`:

    round-robin   M - 1: M equally fast workers, each pushing after the M - 1 others
    uniform       uniform on 0 .. 2(M - 1): the same mean, workers of uneven speed
    FILE          a Ray run's updates.jsonl (or its run directory, or summary.json's staleness histogram):
                  its measured staleness, each gradient's drawn at random

Until tau updates have happened, a gradient uses the initial weights (as M workers pulling at the start
do). The data order is the single-process one, not M interleaved worker shards. The last tau_max + 1
weight versions are checkpointed, so a resumed simulation is exact; it runs in one process only.
"""

from __future__ import annotations

import collections
import random
from pathlib import Path
from typing import Any, Callable

import torch

from gradwise.errors import ConfigError, DataError, UserInputError
from gradwise.io import read_json, read_jsonl
from gradwise.optim.async_rules import apply_rule, async_lr_factor, mean_square_key, rule_lambda, staleness_stats
from gradwise.train.source import BatchSteps

MAX_DELAYS = 10_000_000  # staleness values a Ray run's summary may list (a run of that many gradients)
SIMULATED_RULES = ("asgd", "staleness-aware", "dcasgd-c", "dcasgd-a")


def measured_staleness(spec: str) -> list[int]:
    """The staleness of every gradient a Ray run applied: from its updates.jsonl, its directory, or its
    summary.json's `staleness_histogram`."""
    path = Path(spec)
    path = path / "updates.jsonl" if path.is_dir() else path
    try:
        if path.suffix == ".json":
            histogram = {int(k): int(n) for k, n in read_json(path, DataError)["staleness_histogram"].items()}
            if not 0 < sum(histogram.values()) <= MAX_DELAYS or min(histogram.values()) < 0:
                raise ValueError(f"its counts must be >= 0 and add up to 1..{MAX_DELAYS}")
            values = [k for k, n in histogram.items() for _ in range(n)]
        else:
            values = [int(record["staleness"]) for record in read_jsonl(path, DataError)]
    except (UserInputError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as err:
        raise DataError(f"data error: ps.delay={spec!r} is neither round-robin, uniform nor a readable Ray run's "
                        f"updates.jsonl / summary.json ({type(err).__name__}: {err})") from None
    if not values or min(values) < 0:
        raise DataError(f"data error: ps.delay={spec!r} holds no staleness values >= 0")
    return values


def delay_sampler(spec: str, workers: int, rng: random.Random) -> tuple[Callable[[], int], int]:
    """(draw, largest delay it can return) for `ps.delay`."""
    if spec == "round-robin":
        return (lambda: workers - 1), workers - 1
    if spec == "uniform":
        return (lambda: rng.randint(0, 2 * (workers - 1))), 2 * (workers - 1)
    values = measured_staleness(spec)
    return (lambda: rng.choice(values)), max(values)


def _copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _load(params: list[torch.Tensor], version: list[torch.Tensor]) -> None:
    torch._foreach_copy_(params, version)


class DelayedGradients(BatchSteps):
    """The step source of a simulated asynchronous run of `workers` workers (see the module docstring)."""

    def __init__(self, workers: int):
        super().__init__()
        if workers < 1:
            raise ConfigError(f"usage error: --workers={workers} must be at least 1")
        self.workers = workers
        self.rng = random.Random()
        self.draw: Callable[[], int] | None = None
        self.max_delay = 0
        self.history: collections.deque | None = None  # weight versions, oldest first; the last is the current
        self.rule_state: dict[str, Any] = {}
        self.staleness: list[int] = []
        self.window: list[int] = []

    def configure(self, cfg, world_size: int) -> float:
        """The rule, the process count and `ps.delay` (a Ray run's file read here) checked; the delay stream set."""
        if cfg.ps.rule not in SIMULATED_RULES:
            raise ConfigError(f"config error: ps.rule={cfg.ps.rule} is not simulated (allowed with --strategy "
                              f"simulate: {', '.join(SIMULATED_RULES)}); train it with --strategy async")
        if world_size > 1:
            raise ConfigError("config error: --strategy simulate runs in one process; drop --nproc / torchrun")
        self.rng.seed(cfg.seed)
        self.draw, self.max_delay = delay_sampler(cfg.ps.delay, self.workers, self.rng)
        return async_lr_factor(cfg.ps.rule, cfg.ps.lr_scale, self.workers)

    def train_step(self, engine, batch: Any, global_count: torch.Tensor | None) -> torch.Tensor:
        cfg, params = engine.cfg, engine.params
        if self.history is None:
            self.history = collections.deque([_copy(params)], maxlen=self.max_delay + 1)
        tau = min(self.draw(), len(self.history) - 1)
        stale, current = self.history[-1 - tau], self.history[-1]
        _load(params, stale)  # the weights a worker pulled tau updates ago
        try:
            loss, finite = engine.gradients(batch, global_count)
        finally:
            _load(params, current)
        if finite:
            unused = [p.grad is None for p in params]  # stay without a gradient: the optimizer skips them
            grads = [torch.zeros_like(p) if none else p.grad for p, none in zip(params, unused)]
            worker = len(self.staleness) % self.workers  # the simulated workers push in turn
            corrected = apply_rule(cfg.ps.rule, grads, current, stale, tau, self.rule_state,
                                   rule_lambda(cfg.ps.rule, cfg.ps.dc_lambda), cfg.ps.ms_momentum, cfg.ps.eps,
                                   mean_square_key(cfg.ps.mean_square == "per-worker", worker))
            for p, g, none in zip(params, corrected, unused):
                p.grad = None if none else g
        engine.update(finite)
        if finite:
            self.history.append(_copy(params))
            self.staleness.append(tau)
            self.window.append(tau)
        return loss

    def window_metrics(self) -> dict[str, Any]:
        window, self.window = self.window, []
        return staleness_stats(window)

    @property
    def launch(self) -> dict[str, Any]:
        return {"strategy": "simulate", "workers": self.workers}

    def state_dict(self, trainer) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "rule_state": self.rule_state, "staleness": self.staleness,
                "history": list(self.history or [])}

    def load_state_dict(self, trainer, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        device = trainer.engine.device  # checkpoints load onto the CPU
        self.rule_state = {k: [t.to(device) for t in v] if isinstance(v, list) else v
                           for k, v in state["rule_state"].items()}
        self.staleness = list(state["staleness"])
        self.rng.setstate(state["rng"])  # the delay stream and the weight versions where the checkpoint left them
        versions = [[t.to(device) for t in v] for v in state["history"]]
        self.history = collections.deque(versions, maxlen=self.max_delay + 1) if versions else None

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        super().on_fit_end(trainer, summary)
        summary.update({
            "strategy": "simulate", "rule": trainer.cfg.ps.rule, "workers": self.workers, "delay": trainer.cfg.ps.delay,
            "updates": len(self.staleness), "gradients": trainer.state.step,
            **staleness_stats(self.staleness, histogram=True),
        })
