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


def test_poly_and_step_decay():
    poly = lrs(ScheduleConfig(name="poly", power=2.0, warmup_steps=2), 12, 12)
    for step in range(2, 12):
        assert poly[step] == pytest.approx(2.0 * (1 - (step - 2) / 10) ** 2)
    step = lrs(ScheduleConfig(name="step", step_every=3, gamma=0.5), 7, 7)
    assert step == pytest.approx([2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5])


def test_step_schedule_needs_step_every_and_one_warmup_unit():
    from gradwise.config import load_config
    from gradwise.errors import ConfigError

    with pytest.raises(ConfigError, match="schedule.step_every"):
        load_config(None, ["schedule.name=step"])
    with pytest.raises(ConfigError, match="only one"):
        load_config(None, ["schedule.warmup_steps=5", "schedule.warmup_epochs=1"])


def test_warmup_epochs_and_scale_rules_resolve_at_run_start():
    from conftest import small_config

    from gradwise import Trainer

    # 400 samples, batch 64: 7 steps per epoch
    trainer = Trainer.from_config(small_config("schedule.warmup_epochs=2", "train.steps=30", "optim.lr=0.1",
                                               "schedule.scale_rule=linear", "schedule.base_batch=32"))
    assert trainer.cfg.schedule.warmup_steps == 14 and trainer.cfg.schedule.warmup_epochs is None
    assert trainer.engine.lr == pytest.approx(0.2)
    assert trainer.engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 / 14)  # first warmup step
    sqrt = Trainer.from_config(small_config("optim.lr=0.1", "schedule.scale_rule=sqrt", "schedule.base_batch=16"))
    assert sqrt.engine.lr == pytest.approx(0.2)


@pytest.mark.parametrize("name, lr", [("lars", 5.0), ("lamb", 0.01)])
def test_layerwise_optimizers_train_from_the_config(name, lr):
    from conftest import small_config

    from gradwise import Trainer

    trainer = Trainer.from_config(small_config(f"optim.name={name}", f"optim.lr={lr}", "optim.weight_decay=1e-4",
                                               "train.steps=150", "schedule.warmup_steps=10"))
    first = trainer.evaluate()["test_loss"]
    result = trainer.fit()
    assert result["test_loss"] < first
    assert type(trainer.engine.optimizer).__name__ == name.upper()
