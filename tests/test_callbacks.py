"""The callback events, each fired in a real run with what it carries, and a user callback end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config
from gradwise.train.checks import BatchError
from gradwise import Callback, Trainer
from gradwise.train.callbacks import EVENTS
from gradwise.train.callbacks.base import StepOutput


class Recorder(Callback):
    """Every event, in order, with the argument it came with."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def names(self, event: str) -> list[object]:
        return [arg for name, arg in self.events if name == event]


for _event in EVENTS:
    def _make(event):
        def handler(self, trainer, *args):
            self.events.append((event, args[0] if args else trainer.state.step))
        return handler
    setattr(Recorder, _event, _make(_event))


def run(tmp_path, *extra, callbacks=(), name="run", resume=False, **kwargs):
    cfg = small_config("train.steps=6", "log.every=2", "train.eval_every=3", "train.checkpoint_every=3", *extra)
    if resume:
        trainer = Trainer.resume(tmp_path / name, ["train.steps=9"], callbacks=list(callbacks), **kwargs)
    else:
        trainer = Trainer.from_config(cfg, out_dir=tmp_path / name, callbacks=list(callbacks), **kwargs)
    return trainer, trainer.fit()


def test_fit_start_and_end_bracket_the_run(tmp_path):
    rec = Recorder()
    _, summary = run(tmp_path, callbacks=[rec])
    assert rec.events[0] == ("on_fit_start", 0)
    assert rec.events[-1][0] == "on_fit_end" and rec.events[-1][1] is summary
    assert summary["params_sha256"] and summary["steps"] == 6


def test_step_start_and_end_fire_once_per_step_with_the_output(tmp_path):
    rec = Recorder()
    run(tmp_path, callbacks=[rec])
    assert rec.names("on_step_start") == [0, 1, 2, 3, 4, 5]  # the step about to be taken, counted from 0
    outs = rec.names("on_step_end")
    assert len(outs) == 6 and all(isinstance(o, StepOutput) for o in outs)
    assert [o.samples for o in outs] == [64, 64, 64, 64, 64, 64]  # 400 samples, batch 64: no partial batch yet
    assert all(math.isfinite(float(o.loss)) and o.lr > 0 for o in outs)


def test_evaluate_fires_on_the_cadence_and_at_the_end(tmp_path):
    rec = Recorder()
    trainer, summary = run(tmp_path, callbacks=[rec])
    results = rec.names("on_evaluate")
    assert len(results) == 2 and all("test_loss" in r and "test_accuracy" in r for r in results)
    assert results[-1]["test_loss"] == summary["test_loss"]


def test_log_sees_every_record_and_they_match_metrics_jsonl(tmp_path):
    rec = Recorder()
    run(tmp_path, "diagnostics.every=5", callbacks=[rec])
    logged = rec.names("on_log")
    kinds = [(r["kind"], r["step"]) for r in logged]
    assert kinds == [("train", 2), ("eval", 3), ("train", 4), ("health", 5), ("train", 6), ("eval", 6)]
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in written] == kinds


def test_checkpoint_save_and_load_carry_the_payload(tmp_path):
    rec = Recorder()
    run(tmp_path, callbacks=[rec])
    saved = rec.names("on_checkpoint_save")
    assert [p["step"] for p in saved] == [3, 6] and all("model" in p and "optimizer" in p for p in saved)
    again = Recorder()
    trainer, summary = run(tmp_path, callbacks=[again], resume=True)
    loaded = again.names("on_checkpoint_load")
    assert len(loaded) == 1 and loaded[0]["step"] == 6
    assert again.names("on_message")[0] == "resuming from step 6 of 9"
    assert summary["steps"] == 9 and summary["resumed_from"] == 6


def test_exception_is_reported_then_propagates(tmp_path):
    calls = {"n": 0}

    def failing_loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom in the loss")
        return F.cross_entropy(outputs, targets)

    rec = Recorder()
    cfg = small_config("train.steps=6")
    trainer = Trainer.from_config(cfg, out_dir=tmp_path / "x", callbacks=[rec], loss_fn=failing_loss)
    calls["n"] = 0  # count the run's calls, not the first-batch check's
    with pytest.raises(BatchError, match=r"the training step failed at step 4 \(data position: epoch 0, batch 3 of "
                                         r"7\), "
                                         r"tuple\(float32\[64, 40\], int64\[64\]\): RuntimeError: boom in the loss"):
        trainer.fit()
    errors = rec.names("on_exception")
    assert len(errors) == 1 and "boom" in str(errors[0])
    assert rec.names("on_fit_end") == [] and len(rec.names("on_step_end")) == 3
    assert not (tmp_path / "x" / "summary.json").exists()


def test_message_carries_health_warnings(tmp_path):
    rec = Recorder()
    # a lr this large makes one update move the weights by more than their norm: an exploding verdict
    run(tmp_path, "optim.name=sgd", "optim.lr=50", "diagnostics.every=1", "diagnostics.check_finite=false",
        callbacks=[rec])
    assert any(m.startswith("gradient health at step 1: exploding") for m in rec.names("on_message"))


class StopBelow(Callback):
    """A user's callback: its own record, a summary field, state in checkpoints, and an early end."""

    def __init__(self, target: float):
        self.target, self.best = target, math.inf

    def on_log(self, trainer, record):
        if record["kind"] == "train":
            self.best = min(self.best, record["train_loss"])
            if self.best < self.target and not trainer.state.should_stop:
                trainer.log({"kind": "target", "step": record["step"], "best": self.best})
                trainer.state.should_stop = True

    def state_dict(self, trainer):
        return {"best": self.best}

    def load_state_dict(self, trainer, state):
        self.best = state["best"]

    def on_fit_end(self, trainer, summary):
        summary["best_logged_loss"] = self.best


def test_a_user_callback_logs_stops_and_resumes(tmp_path):
    trainer, first = run(tmp_path, "train.steps=60", "optim.lr=0.01", callbacks=[StopBelow(target=1.7)])
    stopped = first["steps"]
    assert stopped < 60 and stopped % 2 == 0  # stopped at a train record, before the end
    assert first["best_logged_loss"] < 1.7
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "target", "step": stopped, "best": first["best_logged_loss"]} in records
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == stopped and ckpt["callbacks"]["StopBelow"]["best"] == first["best_logged_loss"]
    # resumed with a lower target, the callback's state comes back from the checkpoint
    resumed = StopBelow(target=-1.0)
    trainer = Trainer.resume(tmp_path / "run", [f"train.steps={stopped + 4}"], callbacks=[resumed])
    assert resumed.best == first["best_logged_loss"]
    assert trainer.fit()["steps"] == stopped + 4


def test_callbacks_must_be_callbacks():
    from gradwise.errors import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match="callbacks must subclass it"):
        Trainer.from_config(small_config(), callbacks=[print])


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, out):
        if trainer.state.step == self.step:
            trainer.state.should_stop = True


def test_a_run_a_callback_stops_still_ends_with_a_record_an_evaluation_and_a_checkpoint(tmp_path):
    rec = Recorder()
    _, summary = run(tmp_path, "train.steps=60", "log.every=4", "train.eval_every=50", callbacks=[StopAt(5), rec])
    assert summary["steps"] == 5 and "test_accuracy" in summary
    assert rec.names("on_train_end") == [5]
    assert [(r["kind"], r["step"]) for r in rec.names("on_log")] == [("train", 4), ("train", 5), ("eval", 5)]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 5


def test_the_custom_callback_example_runs(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from launching import run_script

    monkeypatch.chdir(tmp_path)
    run_script(Path(__file__).resolve().parents[1] / "examples" / "custom_callback.py")
    out = capsys.readouterr().out
    assert "loss target 0.6 reached at step" in out and "stopped at step" in out
