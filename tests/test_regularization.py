"""L1/L2 penalties, dropout, DropConnect, the validation split and early stopping (issue 6)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from conftest import SMALL, small_config
from gradwise import load_config
from gradwise.data import build_data
from gradwise.nn import build_model
from gradwise.nn.dropconnect import DropConnectLinear
from gradwise.optim.penalties import penalised_params, penalty
from gradwise.train import Trainer


def run_cli(args):
    from gradwise.cli import main

    return main(args)


def small_mlp(*extra: str) -> nn.Module:
    cfg = load_config(None, ["model.name=mlp", "model.width=32", "model.depth=3", *extra])
    return build_model(cfg.model, (40,), 10, "classification")


# -- penalties -----------------------------------------------------------------------------------------------


def test_l2_penalty_gradient_is_two_c_w_on_weights_only():
    torch.manual_seed(0)
    model = small_mlp()
    params = penalised_params(model)
    penalty(params, l2=0.003).backward()
    for name, p in model.named_parameters():
        if p.ndim > 1:
            torch.testing.assert_close(p.grad, 2 * 0.003 * p.detach(), rtol=1e-6, atol=0)
        else:  # biases: excluded by the optimizer's rule, so untouched by the penalty
            assert p.grad is None, name


def test_l1_penalty_value_and_gradient():
    w = nn.Parameter(torch.tensor([[1.5, -2.0], [0.25, -0.5]]))
    value = penalty([w], l1=0.1, l2=0.01)
    assert value.item() == pytest.approx(0.1 * 4.25 + 0.01 * (2.25 + 4 + 0.0625 + 0.25))
    value.backward()
    torch.testing.assert_close(w.grad, 0.1 * torch.sign(w.detach()) + 0.02 * w.detach())


def test_penalty_exclusion_follows_optim_exclude():
    model = small_mlp()
    names = {n for n, p in model.named_parameters() for q in penalised_params(model, ["*.bias"]) if p is q}
    assert names and all(not n.endswith(".bias") for n in names)
    assert {n for n, p in model.named_parameters() if p.ndim > 1} == names


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_with_l2_penalty_equals_coupled_weight_decay_of_twice_the_coefficient(momentum):
    """regularize.l2=c with plain SGD gives the parameters of optim.weight_decay=2c (torch's coupled decay)."""
    base = ["train.steps=25", "optim.name=sgd", "optim.lr=0.05", f"optim.momentum={momentum}", "seed=3"]
    with_penalty = Trainer.from_config(small_config(*base, "regularize.l2=0.01"))
    with_penalty.fit()
    with_decay = Trainer.from_config(small_config(*base, "optim.weight_decay=0.02"))
    with_decay.fit()
    plain = Trainer.from_config(small_config(*base))
    plain.fit()
    for (name, a), b, c in zip(with_penalty.model.named_parameters(), with_decay.model.parameters(),
                               plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        if a.ndim > 1:
            assert not torch.allclose(a, c, rtol=1e-4), f"{name}: the penalty had no effect"


def test_penalty_is_logged_apart_from_the_training_loss(tmp_path):
    base = [*SMALL, "train.steps=20", "log.every=1", "schedule.name=constant", "optim.name=sgd", "optim.lr=0.05"]
    assert run_cli(["train", "--out", str(tmp_path / "l2"), *base, "regularize.l2=0.5"]) == 0
    assert run_cli(["train", "--out", str(tmp_path / "plain"), *base]) == 0
    first, plain = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][0]
                    for d in ("l2", "plain"))
    # step 1 starts from the same weights and batch: the logged train loss is the data loss alone ...
    assert first["step"] == plain["step"] == 1 and first["train_loss"] == plain["train_loss"]
    # ... and the penalty is 0.5 * sum of squared weights (biases excluded) of those initial weights
    initial = Trainer.from_config(small_config()).model
    assert first["penalty"] == pytest.approx(penalty(penalised_params(initial), l2=0.5).item(), rel=1e-6)
    summary = json.loads((tmp_path / "l2" / "summary.json").read_text())
    assert summary["penalty"] < first["penalty"]  # the weights shrank


# -- dropout -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_args", [
    ["model.name=mlp", "model.width=32", "model.depth=3"],
    ["model.name=cnn", "model.channels=[8,8]", "model.kernel_sizes=[5,3]"],
    ["model.name=transformer", "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.context=16"],
])
def test_dropout_is_identity_in_eval_mode_for_every_model(model_args):
    is_lm = "model.name=transformer" in model_args
    shape, classes, task = ((16,), 20, "language_model") if is_lm else ((40,), 10, "classification")
    torch.manual_seed(0)
    with_dropout = build_model(load_config(None, [*model_args, "model.dropout=0.5"]).model, shape, classes, task)
    assert any(isinstance(m, nn.Dropout) for m in with_dropout.modules())
    without = build_model(load_config(None, model_args).model, shape, classes, task)
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randint(0, 20, (4, 16)) if is_lm else torch.randn(4, 40)
    with_dropout.eval(), without.eval()
    torch.testing.assert_close(with_dropout(x), without(x), rtol=0, atol=0)
    with_dropout.train()
    assert not torch.allclose(with_dropout(x), without(x))


def test_dropout_keeps_the_expected_activation_in_train_mode():
    torch.manual_seed(0)
    model = small_mlp("model.dropout=0.5")
    x = torch.randn(1, 40).expand(40_000, 40)
    model.eval()
    expected = model.stem(x[:1])[0]
    model.train()
    h = model.stem(x)
    live = expected > 0
    assert 0.45 < (h[:, live] == 0).float().mean() < 0.55  # half the units dropped
    units = h[:, live]
    kept = units != 0
    torch.testing.assert_close(units[kept], (2 * expected[live]).expand_as(units)[kept])  # scaled by 1 / (1 - p)
    # inverted scaling: the mean over samples equals the eval-mode activation
    torch.testing.assert_close(h.mean(0), expected, rtol=0.03, atol=0.02)


# -- DropConnect ---------------------------------------------------------------------------------------------


def test_dropconnect_masks_weights_not_activations():
    torch.manual_seed(0)
    layer = DropConnectLinear(64, 48, p=0.5)
    layer.train()
    # input rows are the unit vectors, so output row j is column j of the masked, rescaled weight
    out = layer(torch.eye(64)) - layer.bias.detach()
    w = layer.weight.detach().T  # (16, 12): row j = the weights leaving input j
    dropped = out.abs() < 1e-7
    torch.testing.assert_close(out[~dropped], 2 * w[~dropped])  # kept weights scaled by 1 / (1 - p)
    assert 0.45 < dropped.float().mean() < 0.55
    # one mask per forward, shared by the batch; dropping activations would zero whole rows or columns instead
    mixed_rows = (dropped.any(dim=1) & ~dropped.all(dim=1)).float().mean()
    mixed_columns = (dropped.any(dim=0) & ~dropped.all(dim=0)).float().mean()
    assert mixed_rows == 1 and mixed_columns == 1


def test_dropconnect_mean_rule_at_inference_is_the_plain_layer():
    torch.manual_seed(0)
    layer = DropConnectLinear(16, 12, p=0.4, activation=nn.ReLU())
    layer.eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), F.relu(F.linear(x, layer.weight, layer.bias)))


def test_dropconnect_gaussian_inference_matches_monte_carlo_over_masks():
    """Moment matching approximates E[relu((M * W) x / (1 - p) + b)] over masks; check against sampling masks."""
    torch.manual_seed(0)
    layer = DropConnectLinear(200, 8, p=0.5, activation=nn.ReLU(), inference="gaussian", samples=20_000)
    x = torch.randn(3, 200)
    with torch.no_grad():
        nn.init.normal_(layer.weight, 0.0, 0.1)
        layer.bias.fill_(-0.2)
        masks = torch.empty(20_000, 8, 200).bernoulli_(0.5)
        reference = F.relu(torch.einsum("soi,bi->sbo", masks * layer.weight / 0.5, x) + layer.bias).mean(0)
        layer.eval()
        gaussian = layer(x)
        mean_rule = F.relu(F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(gaussian, reference, rtol=0.05, atol=0.01)
    assert (mean_rule - reference).abs().max() > 3 * (gaussian - reference).abs().max()
    assert torch.equal(layer(x), gaussian)  # deterministic: its own generator, reseeded per call


def test_dropconnect_in_built_models_and_training_runs():
    model = small_mlp("model.dropconnect=0.3")
    assert sum(isinstance(m, DropConnectLinear) for m in model.modules()) == 3  # stem and two blocks
    trainer = Trainer.from_config(small_config("model.name=mlp", "model.width=32", "model.dropconnect=0.3",
                                               "model.dropconnect_inference=gaussian", "train.steps=30"))
    summary = trainer.fit()
    assert summary["test_accuracy"] > 0.15
    lm = build_model(load_config(None, ["model.name=transformer", "model.n_layer=2", "model.d_model=32",
                                        "model.n_head=2", "model.context=16", "model.dropconnect=0.2"]).model,
                     (16,), 20, "language_model")
    assert sum(isinstance(m, DropConnectLinear) for m in lm.modules()) == 2


# -- validation split and early stopping ---------------------------------------------------------------------


def test_validation_split_comes_from_training_data_only():
    base = load_config(None, ["data.num_samples=500"]).data
    carved = load_config(None, ["data.num_samples=500", "data.val_fraction=0.25"]).data
    a, b = build_data(base), build_data(carved)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert len(b.train) + len(b.val) == len(a.train) and len(b.val) == 100
    rows = {tuple(r.tolist()) for r in a.train.tensors[0]}
    assert all(tuple(r.tolist()) in rows for r in b.val.tensors[0])
    train_rows = {tuple(r.tolist()) for r in b.train.tensors[0]}
    assert not any(tuple(r.tolist()) in train_rows for r in b.val.tensors[0])


def contradicting_data(seed=0):
    """Train and validation share inputs but not labels, so validation loss rises as training fits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 20, generator=g)
    y = (x[:, :4].argmax(1))
    return TensorDataset(x, y), TensorDataset(x[:64], (y[:64] + 1) % 4)


def test_early_stopping_stops_and_restores_the_best_weights(tmp_path):
    train, val = contradicting_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = load_config(None, ["train.steps=400", "train.batch_size=32", "train.eval_every=4", "log.progress=off",
                             "log.plots=false", "optim.lr=0.01", "schedule.name=constant",
                             "early_stopping.patience=3"])
    trainer = Trainer(model, train, val_data=val, test_data=val, config=cfg, out_dir=tmp_path / "run")
    summary = trainer.fit()
    es = summary["early_stopping"]
    assert summary["steps"] == es["stopped_at"] < 400
    assert es["stopped_at"] == es["best_step"] + 3 * 4
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert es["best_value"] == min(r["val_loss"] for r in evals)
    # the final weights are the best evaluation's, not the last step's
    assert evals[-1]["restored_from_step"] == es["best_step"]
    assert trainer.evaluate(val, prefix="val")["val_loss"] == pytest.approx(es["best_value"], rel=1e-6)
    assert evals[-2]["val_loss"] > es["best_value"]


def test_early_stopping_state_survives_resume(tmp_path):
    base = [*SMALL, "data.val_fraction=0.2", "train.eval_every=5", "early_stopping.patience=4",
            "optim.lr=0.05", "schedule.name=constant", "train.checkpoint_every=10"]
    assert run_cli(["train", "--out", str(tmp_path / "straight"), "train.steps=60", *base]) == 0
    assert run_cli(["train", "--out", str(tmp_path / "split"), "train.steps=25", *base]) == 0
    assert run_cli(["train", "--resume", str(tmp_path / "split"), "train.steps=60"]) == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("straight", "split"))
    assert a["params_sha256"] == b["params_sha256"] and a["early_stopping"] == b["early_stopping"]
    assert 25 < a["early_stopping"]["stopped_at"] < 60  # the resumed run stopped where the straight one did


def test_a_stopped_run_cannot_be_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", "--out", str(out), *SMALL, "data.val_fraction=0.2", "train.eval_every=2",
                    "early_stopping.patience=1", "optim.lr=0.05", "train.steps=200"]) == 0
    stopped = json.loads((out / "summary.json").read_text())["early_stopping"]["stopped_at"]
    assert stopped < 200
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert run_cli(["train", "--resume", str(out)]) == 2
    assert f"stopped early at step {stopped}" in capsys.readouterr().err
    assert before == {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}


def test_early_stopping_without_validation_data_is_a_config_error(tmp_path, capsys):
    assert run_cli(["train", "--out", str(tmp_path / "x"), *SMALL, "early_stopping.patience=3"]) == 2
    err = capsys.readouterr().err
    assert "early_stopping.patience=3" in err and "data.val_fraction" in err
    assert not (tmp_path / "x").exists()


def test_regularisation_config_errors(tmp_path, capsys):
    assert run_cli(["train", "--out", str(tmp_path / "x"), *SMALL, "model.dropconnect=0.5"]) == 2
    assert "model.dropconnect=0.5" in capsys.readouterr().err
    assert run_cli(["train", "--out", str(tmp_path / "x"), *SMALL, "regularize.l2=-1"]) == 2
    assert "regularize.l2" in capsys.readouterr().err
    assert run_cli(["train", "--out", str(tmp_path / "x"), *SMALL, "data.val_fraction=0.2",
                    "early_stopping.patience=2", "early_stopping.metric=val_bpc"]) == 2
    assert "early_stopping.metric=val_bpc" in capsys.readouterr().err
