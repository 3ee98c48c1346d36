"""The delay simulator (--strategy simulate): each gradient on the weights of tau updates earlier, checked
against an obvious reference loop; one worker is plain training; delays from a Ray run's log; exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL, small_config
from gradwise.data import build_data
from gradwise.asynchronous.delay import DelayedGradients
from gradwise.nn import build_model
from gradwise.train import Trainer
from gradwise.data.sampler import EpochBatches

SGD = ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0", "schedule.name=constant", "diagnostics.every=0",
       "ps.lr_scale=none"]


def run_cli(args):
    from gradwise.cli import main

    return main(args)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def simulate(workers, steps, *extra):
    cfg = small_config(f"train.steps={steps}", *SGD, *extra)
    trainer = Trainer.from_config(cfg, source=DelayedGradients(workers))
    return trainer, trainer.fit()


def reference(workers, steps, *extra, lam=None):
    """Plain SGD where gradient t is computed on the weights after update max(0, t - (M - 1)): a list of every
    weight version, the paper's staleness written out (DC-ASGD-c: g + lam g*g (w - w_stale))."""
    cfg = small_config(f"train.steps={steps}", *SGD, *extra)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    params = list(model.parameters())
    versions = [[p.detach().clone() for p in params]]
    batches = EpochBatches(len(data.train), cfg.train.batch_size, cfg.seed)
    x, y = data.train.tensors
    for t in range(steps):
        idx = batches.next()
        stale = versions[max(0, t - (workers - 1))]
        with torch.no_grad():
            for p, w in zip(params, stale):
                p.copy_(w)
        model.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for p, w, w_stale in zip(params, versions[-1], stale):
                g = p.grad if lam is None else p.grad + lam * p.grad * p.grad * (w - w_stale)
                p.copy_(w - cfg.optim.lr * g)
        versions.append([p.detach().clone() for p in params])
    return params


@pytest.mark.parametrize("rule, lam", [("asgd", None), ("dcasgd-c", 0.5)])
def test_round_robin_gradients_are_computed_on_the_weights_of_m_minus_1_updates_ago(rule, lam):
    extra = [f"ps.rule={rule}", *([f"ps.dc_lambda={lam}"] if lam else [])]
    trainer, result = simulate(4, 15, *extra)
    for ours, theirs in zip(trainer.engine.params, reference(4, 15, lam=lam)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert result["staleness_histogram"] == {"0": 1, "1": 1, "2": 1, "3": 12}  # the first three see fresher weights
    assert result["strategy"] == "simulate" and result["updates"] == result["gradients"] == 15


def test_one_simulated_worker_is_plain_training():
    _, simulated = simulate(1, 12)
    plain = Trainer.from_config(small_config("train.steps=12", *SGD)).fit()
    assert simulated["params_sha256"] == plain["params_sha256"]
    assert simulated["staleness_max"] == 0


def test_delays_drawn_from_a_ray_runs_update_log_and_a_resume_is_exact(tmp_path):
    log = tmp_path / "ray-run"
    log.mkdir()
    (log / "updates.jsonl").write_text("".join(json.dumps({"staleness": s}) + "\n" for s in [0, 5, 5, 2]))
    common = ["--strategy", "simulate", "--workers", "3", *SMALL, *SGD, f"ps.delay={log}", "ps.rule=dcasgd-a",
              "train.checkpoint_every=7"]
    assert run_cli(["train", "--out", str(tmp_path / "straight"), "train.steps=20", *common]) == 0
    straight = summary(tmp_path / "straight")
    assert set(straight["staleness_histogram"]) <= {"0", "1", "2", "3", "4", "5"}  # early ones clipped
    assert straight["staleness_histogram"].get("5", 0) >= 5 and straight["delay"] == str(log)
    assert run_cli(["train", "--out", str(tmp_path / "split"), "train.steps=7", *common]) == 0
    assert run_cli(["train", "--resume", str(tmp_path / "split"), "--strategy", "simulate", "--workers", "3",
                    "train.steps=20"]) == 0
    split = summary(tmp_path / "split")
    assert split["params_sha256"] == straight["params_sha256"]
    assert split["staleness_histogram"] == straight["staleness_histogram"]


def test_an_unused_layer_keeps_no_gradient_so_one_simulated_worker_equals_plain_adamw():
    from torch import nn
    from torch.utils.data import TensorDataset

    from gradwise import load_config

    def fit(source):
        torch.manual_seed(0)
        model = nn.Module()
        model.body, model.spare = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), nn.Linear(4, 4)
        model.forward = model.body.forward  # the spare layer is never called
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
        cfg = load_config(None, ["train.steps=6", "train.batch_size=16", "optim.name=adamw", "optim.weight_decay=0.1",
                                 "log.progress=off", "diagnostics.every=2"])
        return Trainer(model, data, config=cfg, source=source).fit()

    simulated, plain = fit(DelayedGradients(1)), fit(None)
    assert simulated["params_sha256"] == plain["params_sha256"]  # weight decay never touched the spare layer
    assert simulated["health"]["verdict"] != "dead"


def test_simulator_input_errors_are_one_line_with_exit_2(tmp_path, capsys):
    cases = [
        (["ps.rule=ssgd"], "ps.rule=ssgd is not simulated"),
        ([f"ps.delay={tmp_path / 'missing.jsonl'}"], "ps.delay="),
    ]
    for extra, message in cases:
        assert run_cli(["train", "--strategy", "simulate", "--out", str(tmp_path / "r"), *SMALL, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert run_cli(["train", "--strategy", "simulate", "--nproc", "2", *SMALL]) == 2
    assert "runs in one process" in capsys.readouterr().err
    # a simulated run resumed without the flags, and a plain run resumed as a simulation, are refused
    assert run_cli(["train", "--strategy", "simulate", "--workers", "3", "--out", str(tmp_path / "sim"),
                    "train.steps=4", *SMALL]) == 0
    assert run_cli(["train", "--out", str(tmp_path / "plain"), "train.steps=4", *SMALL]) == 0
    capsys.readouterr()
    for run_dir, flags, message in [("sim", [], "--strategy simulate --workers 3"),
                                    ("plain", ["--strategy", "simulate"], "not trained with --strategy simulate")]:
        assert run_cli(["train", "--resume", str(tmp_path / run_dir), "train.steps=8", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_collapse_under_staleness_is_flagged_dead_and_the_default_lr_scale_prevents_it():
    """8 simulated workers at the lr one process trains with (ps.lr_scale=none): the ReLUs die and the health
    verdict says so; the default lr / M trains, as one process does."""
    def health(workers, *extra):
        cfg = small_config("train.steps=60", "optim.lr=0.1", "diagnostics.every=10", "seed=0", *extra)
        return Trainer.from_config(cfg, source=DelayedGradients(workers)).fit()["health"]

    collapsed, scaled, sequential = health(8, "ps.lr_scale=none"), health(8), health(1)
    assert collapsed["verdict"] == "dead" and "blocks.0.branch.0.weight" in collapsed["layers"]
    assert "asynchronous" in collapsed["remedy"]
    assert scaled["verdict"] == "healthy" and sequential["verdict"] == "healthy"


@pytest.mark.parametrize("rule, lr_scale, factor", [("asgd", "inverse-workers", 1 / 4), ("dcasgd-a", "inverse-workers",
                                                    1 / 4), ("staleness-aware", "inverse-workers", 1.0),
                                                    ("asgd", "none", 1.0)])
def test_ps_lr_scale_divides_the_lr_by_the_workers_for_rules_that_apply_stale_gradients(rule, lr_scale, factor):
    from gradwise.asynchronous.server import PushedGradients

    cfg = small_config(*SGD[:-1], f"ps.rule={rule}", f"ps.lr_scale={lr_scale}")
    trainer = Trainer.from_config(cfg, source=DelayedGradients(4))
    assert trainer.engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * factor)
    assert PushedGradients(cfg, 4).configure(cfg, 1) == pytest.approx(factor)  # the Ray server's is the same


def test_a_users_optimizer_is_scaled_by_ps_lr_scale_like_the_configured_one():
    cfg = small_config(*SGD[:-1], "ps.rule=asgd")
    data = build_data(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    mine = torch.optim.SGD(model.parameters(), lr=0.2)
    trainer = Trainer(model, data.train, test_data=data.test, config=cfg, optimizer=mine, source=DelayedGradients(4))
    assert mine.param_groups[0]["lr"] == pytest.approx(0.05) and trainer.engine.scheduler.base_lrs == [0.05]
    trainer.fit()
    assert mine.param_groups[0]["lr"] == pytest.approx(0.05)  # constant schedule: the scaled rate throughout


def test_the_simulator_keeps_a_mean_square_per_simulated_worker_when_asked():
    source = DelayedGradients(3)
    cfg = small_config("ps.rule=dcasgd-a", "ps.mean_square=per-worker", "train.steps=6", "optim.name=sgd")
    Trainer.from_config(cfg, source=source).fit()
    assert sorted(source.rule_state) == ["mean_square/0", "mean_square/1", "mean_square/2"]  # the workers' turns
