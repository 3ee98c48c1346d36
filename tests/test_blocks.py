"""Residual block variants (none/residual/rezero/highway), norms, and init schemes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.config import ModelConfig, load_config
from gradwise.errors import ConfigError
from gradwise.memory.checkpointing import apply_checkpointing
from gradwise.nn import CharTransformer, build_model
from gradwise.nn.blocks import HighwayGate, ResidualBlock


def mlp(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="mlp", depth=5, width=16, **kw), (12,), 4, "classification")


def test_rezero_block_is_the_identity_at_init():
    model = mlp(residual="rezero", activation="tanh")
    block = model.blocks[0]
    x = torch.randn(16)
    jac = torch.autograd.functional.jacobian(lambda v: block(v.unsqueeze(0)).squeeze(0), x)
    assert torch.equal(jac, torch.eye(16))
    h = torch.randn(3, 16)
    assert torch.equal(model.blocks(h), h)  # the whole stack too
    assert [b.alpha.detach().item() for b in model.blocks] == [0.0] * 4  # one scalar per block


def test_rezero_transformer_blocks_are_the_identity_at_init():
    torch.manual_seed(0)
    model = CharTransformer(20, 8, n_layer=3, d_model=16, n_head=2, residual="rezero", norm="none")
    h = torch.randn(2, 8, 16)
    assert torch.equal(model.blocks(h), h)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.blocks.modules())
    assert sum(1 for n, _ in model.named_parameters() if n.endswith("alpha")) == 3  # one per block


@pytest.mark.parametrize("bias, expect", [(-1e4, "input"), (1e4, "branch")])
def test_highway_gate_closed_carries_input_open_takes_branch(bias, expect):
    branch = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    block = ResidualBlock(branch, "highway", gate_features=8, highway_bias=bias)
    x = torch.randn(5, 8)
    assert torch.allclose(block(x), x if expect == "input" else branch(x), atol=1e-6)


def test_highway_gate_starts_mostly_closed():
    model = mlp(residual="highway", highway_bias=-3.0)
    gates = [m for m in model.modules() if isinstance(m, HighwayGate)]
    assert len(gates) == 4 and all(torch.all(g.linear.bias == -3.0) for g in gates)
    t = gates[0](torch.zeros(1, 16))
    assert torch.allclose(t, torch.full_like(t, torch.sigmoid(torch.tensor(-3.0)).item()))


def test_residual_adds_the_branch():
    model = mlp(residual="residual")
    block = model.blocks[0]
    x = torch.randn(3, 16)
    assert torch.allclose(block(x), x + block.branch(x))


@pytest.mark.parametrize("name, shape", [("mlp", (40,)), ("cnn", (40,)), ("transformer", (16,))])
@pytest.mark.parametrize("residual", ["none", "residual", "rezero", "highway"])
def test_every_variant_builds_and_checkpoints_with_equal_gradients(name, shape, residual):
    norm = "none" if residual == "rezero" else ("layer" if name == "transformer" else "batch")
    cfg = ModelConfig(name=name, depth=4, width=16, channels=[8, 8], kernel_sizes=[5, 3], n_layer=2, d_model=16,
                      n_head=2, context=16, residual=residual, norm=norm)
    task = "language_model" if name == "transformer" else "classification"
    torch.manual_seed(0)
    model = build_model(cfg, shape, 10, task)
    x = torch.randint(0, 10, (4, 16)) if task == "language_model" else torch.randn(4, *shape)
    y = torch.randint(0, 10, (4, 16) if task == "language_model" else (4,))
    out = model(x)
    assert out.shape[-1] == 10
    ckpt = copy.deepcopy(model)
    apply_checkpointing(ckpt, "all")
    grads = []
    for m in (model, ckpt):
        m.zero_grad()
        F.cross_entropy(m(x).flatten(0, -2), y.flatten()).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if norm == "batch":
        assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())


def test_post_ln_transformer_normalises_after_each_sum():
    torch.manual_seed(0)
    model = CharTransformer(20, 8, n_layer=1, d_model=16, n_head=2, norm="layer", norm_position="post")
    block = model.blocks[0]
    assert isinstance(block.post1, nn.LayerNorm) and isinstance(block.ln1, nn.Identity)
    out = block(torch.randn(2, 8, 16))
    # a LayerNorm output (default affine) has zero mean and unit variance per position
    assert torch.allclose(out.mean(-1), torch.zeros(2, 8), atol=1e-5)


def test_default_models_keep_their_shape():
    cfg = load_config(None, []).model
    assert cfg.block_residual == "none" and cfg.block_norm == "none"
    t = load_config(None, ["model.name=transformer"]).model
    assert t.block_residual == "residual" and t.block_norm == "layer"
    assert load_config(None, ["model.name=transformer", "model.residual=rezero"]).model.block_norm == "none"


@pytest.mark.parametrize("overrides, fragment", [
    (["model.residual=rezero", "model.norm=layer"], "rezero uses no normalisation"),
    (["model.name=transformer", "model.norm=batch"], "model.norm=batch is not for the transformer"),
    (["model.residual=dense"], "model.residual='dense'"),
])
def test_bad_variants_are_config_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_init_schemes():
    ortho = mlp(init="orthogonal", residual="highway")
    w = ortho.blocks[0].branch[0].weight
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5)
    assert all(torch.all(b.gate.linear.bias == -2.0) for b in ortho.blocks)  # gate bias kept
    assert all(torch.all(m.bias == 0) for m in ortho.modules()
               if isinstance(m, nn.Linear) and not any(m is b.gate.linear for b in ortho.blocks))
    torch.manual_seed(0)
    wide = build_model(ModelConfig(name="mlp", depth=2, width=2048, init="kaiming"), (1024,), 4, "classification")
    std = float(wide.blocks[0].branch[0].weight.detach().std())
    assert std == pytest.approx((2 / 2048) ** 0.5, rel=0.02)
    xavier = build_model(ModelConfig(name="mlp", depth=2, width=2048, init="xavier"), (1024,), 4, "classification")
    assert float(xavier.blocks[0].branch[0].weight.detach().std()) == pytest.approx((2 / 4096) ** 0.5, rel=0.02)
