import math

import pytest
import torch

from gradwise.config import ScheduleConfig
from gradwise.optim import build_scheduler


def lrs(cfg, steps, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(cfg, opt, total)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_constant_with_warmup():
    assert lrs(ScheduleConfig(name="constant", warmup_steps=4), 6, 6) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_warmup_then_cosine_to_min():
    cfg = ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1)
    seen = lrs(cfg, 14, 12)
    assert seen[:2] == [1.0, 2.0]
    for step in range(2, 12):
        progress = (step - 2) / 10
        expected = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert seen[step] == pytest.approx(expected)
    assert seen[12] == seen[13] == pytest.approx(0.2)  # stays at the floor past the horizon


def test_explicit_horizon_wins_over_run_length():
    assert lrs(ScheduleConfig(name="cosine", total_steps=4), 5, 100)[4] == pytest.approx(0.0)
