"""Accumulation, activation checkpointing, mixed precision and clipping, against independent references."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config
from torch import nn
from torch.utils.data import TensorDataset

from gradwise import Trainer, load_config
from gradwise.config import ModelConfig, ScalerConfig
from gradwise.memory.accumulation import loss_weights, micro_batch_slices
from gradwise.memory.checkpointing import apply_checkpointing, segment_size
from gradwise.memory.measure import ActivationMeter
from gradwise.memory.precision import LossScaler, Precision
from gradwise.nn import CharTransformer, build_model


@torch.no_grad()
def relative_gap(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).norm() / q.norm().clamp(min=1e-12)) for p, q in zip(a.parameters(), b.parameters()))


def test_micro_batch_slices():
    assert [s.stop - s.start for s in micro_batch_slices(10, 3)] == [4, 3, 3]
    assert [s.stop - s.start for s in micro_batch_slices(2, 4)] == [1, 1]  # empty parts dropped
    assert [s.stop - s.start for s in micro_batch_slices(64, 1, 24)] == [24, 24, 16]
    w = loss_weights([torch.tensor(3), torch.tensor(1)])
    assert [float(x) for x in w] == [0.75, 0.25]


@pytest.mark.parametrize("split", [["train.accumulate=4"], ["train.micro_batch_size=24"], ["train.accumulate=3"]])
def test_accumulation_equals_one_big_batch_classification(split):
    # 400 samples, batch 64: the epoch's last batch has 16 samples, so micro-batches are uneven
    base = ["model.name=mlp", "model.depth=3", "model.width=32", "train.steps=14", "optim.name=sgd", "optim.lr=0.1"]
    big = Trainer.from_config(small_config(*base))
    big.fit()
    accumulated = Trainer.from_config(small_config(*base, *split))
    result = accumulated.fit()
    assert relative_gap(accumulated.model, big.model) < 1e-6
    assert result["final_train_loss"] == pytest.approx(big.summary()["final_train_loss"], rel=1e-5)


def padded_lm_data(n=24, context=12, vocab=11, seed=0):
    """Sequences of varying length padded with target -100: token counts differ per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, context), generator=g)
    y = torch.randint(0, vocab, (n, context), generator=g)
    lengths = torch.randint(1, context + 1, (n,), generator=g)
    for i, length in enumerate(lengths):
        y[i, length:] = -100
    return TensorDataset(x, y)


def test_accumulation_equals_one_big_batch_for_variable_length_lm():
    data = padded_lm_data()
    runs = {}
    for name, extra in (("big", []), ("acc", ["train.accumulate=4"])):
        torch.manual_seed(0)
        model = CharTransformer(vocab_size=11, context=12, n_layer=2, d_model=16, n_head=2)
        cfg = load_config(None, ["train.batch_size=8", "train.steps=6", "optim.name=sgd", "optim.lr=0.5",
                                 "log.progress=off", *extra])
        trainer = Trainer(model, data, config=cfg, task="language_model")
        trainer.fit()
        runs[name] = trainer
    assert relative_gap(runs["acc"].model, runs["big"].model) < 1e-6
    # the token counts really differ between micro-batches, so a plain 1/N average would not match
    counts = [int((data.tensors[1][s] != -100).sum()) for s in micro_batch_slices(8, 4)]
    assert len(set(counts)) > 1


@pytest.mark.parametrize("policy", ["all", "sqrt", "every:2"])
def test_checkpointed_gradients_equal_plain_with_dropout(policy):
    torch.manual_seed(1)
    plain = CharTransformer(vocab_size=13, context=16, n_layer=4, d_model=32, n_head=4, dropout=0.3).train()
    ckpt = copy.deepcopy(plain)
    assert apply_checkpointing(ckpt, policy) > 0
    x = torch.randint(0, 13, (4, 16))
    y = torch.randint(0, 13, (4, 16))

    def grads(model):
        torch.manual_seed(7)  # same dropout masks in the first forward
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
        return [p.grad for p in model.parameters()], torch.get_rng_state()

    g_plain, rng_plain = grads(plain)
    g_ckpt, rng_ckpt = grads(ckpt)
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert torch.equal(rng_plain, rng_ckpt)  # recompute does not advance the global RNG


@pytest.mark.parametrize("name, shape", [("mlp", (40,)), ("cnn", (40,))])
def test_checkpointing_built_in_models_keeps_gradients_and_cuts_saved_activations(name, shape):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, depth=9, width=64, channels=[8] * 4, kernel_sizes=[3] * 4)
    plain = build_model(cfg, shape, 10, "classification")
    x, y = torch.randn(32, *shape), torch.randint(0, 10, (32,))
    saved = {}
    for policy in ("none", "all", "sqrt"):
        model = copy.deepcopy(plain)
        apply_checkpointing(model, policy)
        meter = ActivationMeter(model)
        with meter.track():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        saved[policy] = meter.bytes
        for a, b in zip(plain.parameters(), model.parameters()):
            if policy == "none":
                a.grad = b.grad.clone()  # the reference
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    # Linear/conv + ReLU blocks: "none" already keeps just one tensor per block boundary (the ReLU
    # output is the next layer's saved input), so "all" keeps the same; sqrt keeps ~sqrt(n) boundaries.
    assert saved["sqrt"] < 0.75 * saved["none"] and saved["all"] <= saved["none"]


def test_segment_sizes():
    assert [segment_size(p, 64) for p in ("none", "all", "sqrt", "every:4")] == [0, 1, 8, 4]
    assert segment_size("sqrt", 10) == 4


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(0.2))

    def forward(self, x):
        return x + self.f(x)


def test_checkpointing_a_users_own_modules_by_class_name():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 16), *[Residual(16) for _ in range(4)], nn.Linear(16, 3))
    ckpt = copy.deepcopy(plain)
    keys = list(ckpt.state_dict())
    assert apply_checkpointing(ckpt, "none", ["Residual"]) == 4
    assert list(ckpt.state_dict()) == keys  # checkpoints stay loadable
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(3)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # a deep copy computes with its own parameters
    twin = copy.deepcopy(ckpt)
    twin.zero_grad(set_to_none=True)
    ckpt.zero_grad(set_to_none=True)
    F.cross_entropy(twin(x), y).backward()
    assert all(p.grad is not None for p in twin.parameters())
    assert all(p.grad is None for p in ckpt.parameters())
    assert type(twin[1]).__name__ == "Residual" and isinstance(twin[1], Residual)
    from gradwise.errors import ConfigError

    with pytest.raises(ConfigError, match=r"memory.modules=\['Nope'\] match no module"):
        apply_checkpointing(copy.deepcopy(plain), "none", ["Nope"])


def tiny_fp16_trainer(*extra):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(32, 4)
    data = TensorDataset(x, torch.randint(0, 3, (32,)))
    cfg = load_config(None, ["precision=fp16", "train.batch_size=8", "optim.name=sgd", "optim.momentum=0",
                             "optim.lr=1.0", "schedule.name=cosine", "train.steps=10", "log.progress=off", *extra])
    return Trainer(model, data, config=cfg)


def test_fp16_overflow_skips_optimizer_and_scheduler_and_backs_off():
    trainer = tiny_fp16_trainer("scaler.init_scale=1e30")  # the scaled fp16 backward overflows
    x, y = trainer.train_data.tensors
    before = [p.detach().clone() for p in trainer.model.parameters()]
    lr_before, epoch_before = trainer.engine.optimizer.param_groups[0]["lr"], trainer.engine.scheduler.last_epoch
    trainer.engine.train_step((x[:8], y[:8]))
    scaler = trainer.engine.precision.scaler
    assert scaler.skipped_steps == 1 and scaler.scale == pytest.approx(0.5e30)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.engine.scheduler.last_epoch == epoch_before
    assert trainer.engine.optimizer.param_groups[0]["lr"] == lr_before
    # it keeps backing off until the scaled gradients fit, then an update goes through
    for _ in range(200):
        trainer.engine.train_step((x[:8], y[:8]))
        if trainer.engine.scheduler.last_epoch > epoch_before:
            break
    assert trainer.engine.scheduler.last_epoch == epoch_before + 1
    assert trainer.engine.precision.scaler.scale * 8 < 65504 * 1e3  # roughly in fp16's range now
    assert not all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    state = trainer.engine.precision.scaler.state_dict()
    other = LossScaler(ScalerConfig())
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_clipping_happens_after_unscale():
    trainer = tiny_fp16_trainer("train.clip_norm=0.01", "scaler.init_scale=1024")
    x, y = trainer.train_data.tensors
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.engine.train_step((x[:8], y[:8]))
    assert trainer.engine.precision.scaler.skipped_steps == 0
    # SGD with lr 1 moves by exactly the clipped gradient: its norm must be clip_norm, not clip_norm / scale
    moved = torch.sqrt(sum(((b - p.detach()) ** 2).sum() for b, p in zip(before, trainer.model.parameters())))
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in trainer.model.parameters()))
    assert float(grad_norm) == pytest.approx(0.01, rel=1e-3)
    assert float(moved) == pytest.approx(0.01, rel=1e-3)  # the first cosine step uses the full lr of 1


def test_clip_value_bounds_every_element():
    trainer = tiny_fp16_trainer("precision=fp32", "train.clip_value=1e-4")
    x, y = trainer.train_data.tensors
    trainer.engine.train_step((x[:8], y[:8]))
    assert max(float(p.grad.abs().max()) for p in trainer.model.parameters()) <= 1e-4


def test_loss_scale_trajectory_matches_torch_grad_scaler():
    cfg = small_config("precision=fp16", "scaler.init_scale=1024", "scaler.growth_interval=3")
    ours = Precision(cfg, torch.device("cpu"))
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    pattern = [False, False, False, False, True, False, False, False, True, True, False, False, False, False]
    for overflow in pattern:
        grad = torch.tensor([1.0, float("inf") if overflow else 2.0, 3.0])
        p.grad = grad * ours.scale
        finite = ours.unscale_and_check([p.grad], lambda flag: flag)
        assert finite == (not overflow) and (not finite or torch.equal(p.grad, grad))
        ours.settle(finite)
        theirs.scale(torch.ones(()))  # GradScaler initialises its scale lazily here
        p.grad = grad * theirs.get_scale()
        theirs.step(opt)
        theirs.update()
        assert ours.scale == theirs.get_scale()
    assert ours.skipped_steps == sum(pattern)
    other = Precision(cfg, torch.device("cpu"))
    other.load_state_dict(ours.state_dict())
    assert other.state_dict() == ours.state_dict()


def test_bf16_and_fp16_training_runs_and_reports(tmp_path):
    for precision in ("bf16", "fp16"):
        cfg = small_config("model.name=mlp", "model.depth=2", "model.width=16", "train.steps=20",
                           f"precision={precision}", "log.every=10")
        result = Trainer.from_config(cfg, out_dir=tmp_path / precision).fit()
        assert result["skipped_steps"] >= 0 and result["test_accuracy"] > 0.15
        assert ("loss_scale" in result) == (precision == "fp16")
        for p in Trainer.from_config(cfg).model.parameters():
            assert p.dtype == torch.float32  # master weights stay fp32
