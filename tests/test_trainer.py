"""Parity with a plain PyTorch loop, exact resume, and the Python API with a user's own pieces."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from gradwise import Trainer, load_config
from gradwise.data import build_data
from gradwise.nn import build_model
from gradwise.checkpoint.format import params_sha256

from conftest import SMALL, small_config


def plain_loop(cfg, steps):
    """A hand-written loop: the documented batch order, torch's optimizer, an inline warmup+cosine lambda."""
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    x, y = data.train.tensors
    o = cfg.optim
    # the usual hand-written split: no weight decay on biases (1-D tensors)
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": o.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if o.name == "sgd":
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    else:
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)  # as gradwise builds it
    warm, total = cfg.schedule.warmup_steps, steps

    def factor(s):
        if s < warm:
            return (s + 1) / warm
        if cfg.schedule.name == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    bs, n = cfg.train.batch_size, len(y)
    step, epoch = 0, 0
    model.train()
    while step < steps:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        for start in range(0, n, bs):
            if step == steps:
                break
            idx = perm[start:start + bs]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
            step += 1
        epoch += 1
    return model


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.name=sgd", "optim.lr=0.05", "optim.nesterov=true", "optim.weight_decay=1e-4",
         "schedule.name=cosine", "schedule.warmup_steps=5"],
        ["optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.01", "schedule.name=constant"],
    ],
)
def test_identical_parameters_to_a_plain_loop(extra):
    cfg = small_config("train.steps=30", "seed=7", *extra)  # 7 batches/epoch, the last one partial
    trainer = Trainer.from_config(cfg)
    trainer.fit()
    reference = plain_loop(cfg, 30)
    for (name, ours), theirs in zip(trainer.model.named_parameters(), reference.parameters()):
        assert torch.equal(ours, theirs), name
    assert params_sha256(trainer.model) == params_sha256(reference)


def run_cli(args):
    from gradwise.cli import main

    return main(args)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(
    "first_steps, extra",
    [
        (20, ["schedule.name=constant"]),  # extend a finished run
        (7, ["schedule.name=constant"]),  # checkpoint exactly at an epoch end
        (10, ["schedule.name=cosine", "schedule.total_steps=40", "schedule.warmup_steps=3"]),  # mid-epoch, cosine
    ],
)
def test_resume_is_exact(tmp_path, first_steps, extra):
    base = [*SMALL, "optim.name=sgd", "optim.lr=0.05", *extra]
    assert run_cli(["train", "--out", str(tmp_path / "straight"), "train.steps=40", *base]) == 0
    assert run_cli(["train", "--out", str(tmp_path / "split"), f"train.steps={first_steps}", *base]) == 0
    first = summary(tmp_path / "split")
    assert first["steps"] == first_steps
    assert run_cli(["train", "--resume", str(tmp_path / "split"), "train.steps=40"]) == 0
    resumed, straight = summary(tmp_path / "split"), summary(tmp_path / "straight")
    assert resumed["steps"] == 40 and resumed["resumed_from"] == first_steps
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert resumed["test_loss"] == straight["test_loss"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_resume_restores_rng_so_dropout_matches(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    common = ["data.name=text", f"data.path={tmp_path / 'corpus'}", "model.name=transformer", "model.n_layer=1",
              "model.d_model=16", "model.n_head=2", "model.context=16", "model.dropout=0.3",
              "train.batch_size=8", "optim.lr=0.003", "schedule.name=constant", "log.progress=off", "log.plots=false"]
    assert run_cli(["train", "--out", str(tmp_path / "a"), "train.steps=24", *common]) == 0
    assert run_cli(["train", "--out", str(tmp_path / "b"), "train.steps=9", *common]) == 0
    assert run_cli(["train", "--resume", str(tmp_path / "b"), "train.steps=24"]) == 0
    a, b = summary(tmp_path / "a"), summary(tmp_path / "b")
    assert a["params_sha256"] == b["params_sha256"]
    assert "test_bpc" in a and a["task"] == "language_model"


def test_checkpoint_loads_weights_only_and_holds_everything(tmp_path):
    assert run_cli(["train", "--out", str(tmp_path / "r"), "train.steps=5", *SMALL]) == 0
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "step", "position", "rng", "config", "callbacks", "launch"):
        assert key in ckpt
    assert len(ckpt["rng"]) == 1 and set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}  # one process's
    assert set(ckpt["callbacks"]) >= {"Evaluator", "MetricsFile", "TrainMetrics"}  # each callback's own state
    assert ckpt["step"] == 5 and ckpt["config"]["train"]["steps"] == 5
    model = build_model(load_config(None, SMALL).model, (40,), 10, "classification")
    model.load_state_dict(ckpt["model"])


class LinearTargets(Dataset):
    """Not a TensorDataset: items are collated one by one."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], (self.x[i] * torch.tensor([1.0, -2.0, 0.5])).sum(0, keepdim=True)


def test_python_api_with_users_own_model_data_and_loss(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1))
    cfg = load_config(None, ["train.steps=300", "train.batch_size=32", "optim.lr=0.01", "train.eval_every=100",
                             "log.progress=off", "log.plots=true"])
    trainer = Trainer(model, LinearTargets(256), test_data=LinearTargets(64), loss_fn=F.mse_loss,
                      config=cfg, out_dir=tmp_path / "run", task="regression")
    first = trainer.evaluate()["test_loss"]
    result = trainer.fit()
    assert result["test_loss"] < 0.2 * first
    assert "test_accuracy" not in result
    assert (tmp_path / "run" / "plots" / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [100, 200, 300]
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["samples_per_s"] > 0 and r["grad_norm"] > 0 and "lr" in r for r in train)


def test_summary_reports_the_required_fields(tmp_path):
    trainer = Trainer.from_config(small_config("train.steps=12"), out_dir=tmp_path / "r")
    result = trainer.fit()
    for key in ("final_train_loss", "test_loss", "test_accuracy", "steps", "wall_seconds",
                "samples_per_second", "params_sha256"):
        assert key in result
    assert result == json.loads((tmp_path / "r" / "summary.json").read_text())
    assert result["steps"] == 12 and 0 <= result["test_accuracy"] <= 1 and len(result["params_sha256"]) == 64
    assert result["samples_per_second"] > 0


def test_epochs_set_the_run_length():
    trainer = Trainer.from_config(small_config("train.epochs=2", "train.steps=null"))
    assert trainer.total_steps == 2 * 7
    result = trainer.fit()
    assert result["epochs"] == 2.0


def test_fit_in_parts_is_one_run(tmp_path):
    cfg = small_config("train.steps=10", "log.every=2", "optim.name=sgd", "optim.lr=0.05")
    parts = Trainer.from_config(cfg, out_dir=tmp_path / "parts")
    assert parts.fit(max_steps=4)["steps"] == 4
    summary = parts.fit()
    straight = Trainer.from_config(cfg, out_dir=tmp_path / "straight").fit()
    assert summary["steps"] == 10 and summary["params_sha256"] == straight["params_sha256"]
    records = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8, 10]
