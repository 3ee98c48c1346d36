"""Gradient-health verdicts, naming the layer where a non-finite value appeared, and rollback."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from gradwise import Trainer, load_config
from gradwise.config import ModelConfig
from gradwise.diagnostics.health import judge, layer_stats, zero_gradient_layers
from gradwise.errors import NonFiniteError
from gradwise.nn import build_model
from gradwise.train.step import NonFiniteStep


def deep_mlp(scale: float, activation: str, depth: int = 24):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=depth, width=64, activation=activation), (32,), 10,
                        "classification")
    with torch.no_grad():
        for block in model.blocks:
            block.branch[0].weight.mul_(scale)
    return model


def stats_after_backward(model):
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return layer_stats(model)


def test_a_deliberately_vanishing_net_is_flagged_with_its_early_layers():
    verdict = judge(stats_after_backward(deep_mlp(0.2, "tanh")))
    assert verdict.verdict == "vanishing"
    assert "stem.1.weight" in verdict.layers and "head.weight" not in verdict.layers
    assert "rezero" in verdict.remedy


def test_a_deliberately_exploding_net_is_flagged():
    verdict = judge(stats_after_backward(deep_mlp(4.0, "relu")))  # each layer multiplies the signal by ~2.4
    assert verdict.verdict == "exploding" and verdict.layers
    assert "clip_norm" in verdict.remedy


def test_a_plain_small_net_is_healthy():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=3, width=64), (32,), 10, "classification")
    assert judge(stats_after_backward(model)).verdict == "healthy"


def test_a_net_whose_relus_all_died_is_flagged_dead_and_an_unused_layer_is_not():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=3, width=64), (32,), 10, "classification")
    with torch.no_grad():
        model.stem[1].bias.fill_(-100.0)  # every unit of the first hidden layer is negative: ReLU passes nothing
    spare = torch.nn.Linear(8, 8)  # never called: no gradient at all
    model.spare = spare
    first = stats_after_backward(model)
    assert judge(first).verdict == "vanishing"  # one check alone: a zero-initialised gate looks the same
    verdict = judge(stats_after_backward(model), zero_before=zero_gradient_layers(first))
    assert verdict.verdict == "dead" and "spare.weight" not in verdict.layers
    assert "stem.1.weight" in verdict.layers and "head.weight" not in verdict.layers
    assert "optim.lr" in verdict.remedy
    del model.spare
    with torch.no_grad():
        model.stem[1].bias.zero_()
    assert judge(stats_after_backward(model)).verdict == "healthy"


def test_rezero_at_initialisation_is_not_called_dead():
    """alpha = 0 zeroes every branch's gradient until the first update: not a dead network."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=4, width=16, residual="rezero"), (32,), 10, "classification")
    cfg = load_config(None, ["train.batch_size=16", "train.steps=3", "log.progress=off", "log.plots=false",
                             "optim.name=adam", "optim.lr=0.01", "diagnostics.every=1"])
    trainer = Trainer(model, data(), config=cfg)
    trainer.fit()
    verdicts = [r["verdict"] for r in trainer.records if r["kind"] == "health"]
    assert len(verdicts) == 3 and "dead" not in verdicts


def data(n=64):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def small_trainer(out_dir=None, *extra, loss_fn=None):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=4, width=16), (32,), 10, "classification")
    cfg = load_config(None, ["train.batch_size=16", "train.steps=12", "log.progress=off", "log.plots=false",
                             "optim.name=sgd", "optim.lr=0.1", *extra])
    return Trainer(model, data(), config=cfg, out_dir=out_dir, loss_fn=loss_fn)


def test_a_nan_injected_in_one_layer_is_named():
    trainer = small_trainer()
    with torch.no_grad():
        trainer.model.blocks[1].branch[0].weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    x, y = data().tensors
    with pytest.raises(NonFiniteStep) as err:
        trainer.engine.train_step((x[:16], y[:16]))
    assert err.value.where == "blocks.1.branch.0" and err.value.stage == "activation in forward"
    after = list(trainer.model.parameters())
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(before, after))  # not applied
    with pytest.raises(NonFiniteError, match=r"first appeared in 'blocks.1.branch.0'"):
        trainer.fit()


class NanOnce:
    """A loss that returns NaN on one call: a transient blow-up the run can recover from."""

    def __init__(self, at_call):
        self.calls, self.at_call = 0, at_call

    def __call__(self, out, y):
        self.calls += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if self.calls == self.at_call else loss


def test_rollback_to_the_last_checkpoint_with_a_lower_lr(tmp_path):
    trainer = small_trainer(tmp_path / "run", "train.checkpoint_every=4", "diagnostics.on_nonfinite=rollback",
                            "schedule.name=constant", loss_fn=NanOnce(at_call=7))
    trainer.engine.loss_fn.calls = 0  # count the training run's calls, not the first-batch check's
    summary = trainer.fit()
    assert summary["steps"] == 12 and summary["rollbacks"] == 1
    assert trainer.engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rollback = [r for r in records if r["kind"] == "rollback"]
    assert rollback == [{"kind": "rollback", "step": 7, "layer": "loss", "to_step": 4, "lr_factor": 0.5}]


def test_rollback_without_a_checkpoint_stops_with_a_clear_error():
    trainer = small_trainer(None, "diagnostics.on_nonfinite=rollback", loss_fn=NanOnce(at_call=2))
    with pytest.raises(NonFiniteError, match="no checkpoint to roll back to"):
        trainer.fit()


def test_health_records_every_n_steps(tmp_path):
    trainer = small_trainer(tmp_path / "run", "diagnostics.every=4")
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    health = [r for r in records if r["kind"] == "health"]
    assert [r["step"] for r in health] == [4, 8, 12]
    layer = health[0]["per_layer"][0]
    assert layer["name"] == "stem.1.weight" and layer["grad_norm"] > 0 and 0 < layer["update_ratio"] < 1
    assert summary["health"]["verdict"] in ("healthy", "vanishing", "dead", "exploding")
