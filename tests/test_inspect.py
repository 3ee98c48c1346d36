"""The Jacobian measure and spectral norms against closed forms, and `gradwise inspect`."""

import json

import pytest
import torch
from torch import nn

from gradwise.cli import main
from gradwise.config import load_config
from gradwise.tools.inspect import format_report
from gradwise.train.checks import BatchError
from gradwise.diagnostics.spectra import jacobian_mean_sq_singular_value, spectral_norm

from conftest import SMALL


def scaled_identity_stack(c: float, depth: int, width: int = 6) -> nn.Module:
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(c * torch.eye(width))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("c, depth", [(1.0, 5), (2.0, 3), (0.5, 4)])
def test_jacobian_measure_of_a_scaled_identity_stack_is_c_to_the_2n(c, depth):
    chi = jacobian_mean_sq_singular_value(scaled_identity_stack(c, depth), torch.randn(4, 6))
    assert chi == pytest.approx(c ** (2 * depth), rel=1e-5)


def test_jacobian_measure_matches_the_exact_trace_for_a_random_linear_map():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64, bias=False)
    exact = float((layer.weight.detach() ** 2).sum() / 64)  # tr(W W^T) / d
    chi = jacobian_mean_sq_singular_value(layer, torch.randn(2, 64), probes=400)
    assert chi == pytest.approx(exact, rel=0.05)


def test_spectral_norm_by_power_iteration():
    torch.manual_seed(0)
    w = torch.randn(30, 20)
    assert spectral_norm(w, iterations=200) == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-4)


def test_inspect_cli_table_and_json(capsys):
    base = [*SMALL, "model.name=mlp", "model.depth=9", "model.width=16"]
    assert main(["inspect", "--steps", "2", "model.residual=rezero", *base]) == 0
    out = capsys.readouterr().out
    assert "| layer | grad norm | weight norm | update/weight | spectral norm | flag |" in out
    assert "mean squared singular value 1 " in out  # ReZero: the identity at init
    assert main(["inspect", "--json", "--steps", "2", "model.activation=tanh", *base]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["blocks"] == 8 and len(report["layers"]) == 10
    assert report["verdict"]["verdict"] in ("healthy", "vanishing", "dead", "exploding")
    assert 0 < report["jacobian_mean_sq_singular_value_at_init"] < 1  # a plain tanh stack contracts
    assert set(report["spectral_norms_at_init"]) >= {"stem.1", "head"}
    assert main(["inspect", "--steps", "0", *base]) == 2


# -- a model of your own ---------------------------------------------------------------------------------------


class Scaled(nn.Module):
    """A block of the user's own: h -> c * h, so the chain of `depth` blocks has Jacobian c^depth * I."""

    def __init__(self, c: float):
        super().__init__()
        self.linear = nn.Linear(6, 6, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(c * torch.eye(6))

    def forward(self, h):
        return self.linear(h)


class Chain(nn.Module):
    def __init__(self, c: float, depth: int):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.blocks = nn.ModuleList(Scaled(c) for _ in range(depth))

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def rows(n: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_gradwise_inspect_on_a_users_model_measures_its_own_blocks():
    """The Jacobian over the user's repeated blocks against its closed form c^(2 depth); the table covers every
    weight; the report names the model's class and its block class."""
    import gradwise

    config = load_config(None, [*SMALL, "train.batch_size=16", "early_stopping.patience=2"])  # never evaluates
    report = gradwise.inspect(Chain(0.5, 3), rows(), val_data=rows(16), config=config, steps=2, probes=400)
    assert report["model"] == "Chain" and report["blocks"] == 3 and report["block_class"] == "Scaled"
    assert report["jacobian_mean_sq_singular_value_at_init"] == pytest.approx(0.5 ** 6, rel=0.15)
    assert len(report["layers"]) == 5 and report["verdict"]["verdict"] in ("healthy", "vanishing", "dead")
    assert "Chain with 3 blocks" in format_report(report)


def test_gradwise_inspect_on_a_hugging_face_model_and_a_mismatched_loss():
    import gradwise
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=32,
                                                                n_positions=16))
    tokens = torch.randint(0, 32, (32, 8))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    report = gradwise.inspect(gpt2, data, config=load_config(None, [*SMALL, "train.batch_size=8"]), steps=2)
    assert report["block_class"] == "GPT2Block" and report["blocks"] == 3
    assert report["jacobian_mean_sq_singular_value_at_init"] > 0
    with pytest.raises(BatchError, match="the loss failed on the first batch"):
        gradwise.inspect(Chain(1.0, 2), rows(), loss_fn=lambda out, y: out.sum(dim=5))
