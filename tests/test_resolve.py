"""The config is resolved once: horizon, warmup in epochs and the planner's choice, into a frozen config."""

from __future__ import annotations

import pytest

from conftest import small_config
from gradwise import Trainer
from gradwise.resolve import resolve_config


def test_resolution_fixes_horizon_and_warmup_and_is_idempotent():
    cfg = small_config("train.steps=30", "schedule.warmup_epochs=1.5")
    resolved = resolve_config(cfg, 400)  # batch 64: 7 batches per epoch
    assert resolved.schedule.total_steps == 30 and resolved.schedule.warmup_steps == 10
    assert resolved.schedule.warmup_epochs is None and cfg.schedule.total_steps is None  # the input is untouched
    assert resolve_config(resolved, 400) == resolved
    assert resolve_config(small_config("train.steps=30"), 400, gradients_per_update=4).schedule.total_steps == 7


def test_a_resolved_config_is_frozen():
    resolved = resolve_config(small_config(), 400)
    with pytest.raises(TypeError, match="resolved and frozen"):
        resolved.optim.lr = 1.0
    trainer = Trainer.from_config(small_config())
    with pytest.raises(TypeError, match="resolved and frozen"):
        trainer.cfg.train.eval_every = 1
    edited = trainer.cfg.thawed()
    edited.train.eval_every = 1
    assert edited.train.eval_every == 1 and trainer.cfg.train.eval_every != 1


def test_from_config_plans_once_and_records_the_choice(tmp_path):
    trainer = Trainer.from_config(small_config("memory.auto=true", "memory.budget=1GiB", "train.steps=2"),
                                  out_dir=tmp_path / "run")
    assert trainer.cfg.memory.auto is False
    trainer.fit()
    assert "auto: false" in (tmp_path / "run" / "config.yaml").read_text()
