"""The Jacobian measure and spectral norms against closed forms, and `gradwise inspect`."""

import json

import pytest
import torch
from torch import nn

from gradwise.cli import main
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
