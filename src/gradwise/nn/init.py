"""Weight initialisation schemes for Linear and Conv1d layers (`model.init`).

    default     PyTorch's own (the transformer: normal(0, 0.02))
    xavier      Glorot uniform (Glorot & Bengio 2010)
    kaiming     He normal for ReLU (He et al. 2015)
    orthogonal  orthogonal matrices (Saxe et al. 2014)

Biases become zero, except a Highway gate's bias, which keeps its negative start.
"""

from __future__ import annotations

from torch import nn

from gradwise.nn.blocks import HighwayGate

INITS = ("default", "xavier", "kaiming", "orthogonal")


def apply_init(model: nn.Module, scheme: str) -> None:
    if scheme == "default":
        return
    gate_layers = {id(m.linear) for m in model.modules() if isinstance(m, HighwayGate)}
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d)):
            continue
        if scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        elif scheme == "kaiming":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        else:
            nn.init.orthogonal_(module.weight)
        if module.bias is not None and id(module) not in gate_layers:
            nn.init.zeros_(module.bias)
