"""Residual block variants shared by the built-in models (seed 000, 003, 004).

A block wraps a branch F (and an optional shortcut P, identity when shapes
match):

    none       y = F(x)
    residual   y = P(x) + F(x)
    rezero     y = P(x) + alpha F(x)        one scalar alpha, initialised to 0 (Bachlechner et al. 2020)
    highway    y = F(x) T(x) + P(x) (1 - T(x)),  T = sigmoid(W_T x + b_T), b_T initialised
               negative so the gate starts mostly closed (Srivastava et al. 2015)

With P the identity, a ReZero block is exactly the identity at initialisation.
When P is a projection (a CNN block that changes shape), the gate reads P(x).
`combine` is the rule itself; `ResidualBlock` wraps one branch, and the
transformer block applies it to each of its two sublayers with one shared alpha.
"""

from __future__ import annotations

import torch
from torch import nn

from gradwise.memory.checkpointing import CheckpointedSegments

RESIDUALS = ("none", "residual", "rezero", "highway")


class BlockStack(CheckpointedSegments):
    """A built-in model's blocks, applied in order, optionally in checkpointed segments
    (`gradwise.memory.checkpointing.apply_checkpointing` sets `segment`)."""


class HighwayGate(nn.Module):
    """T(x) = sigmoid(W x + b) over the feature axis (`channel_dim`), bias initialised to `bias`."""

    def __init__(self, features: int, bias: float, channel_dim: int = -1):
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.channel_dim = channel_dim
        nn.init.constant_(self.linear.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(self.channel_dim, -1)
        return torch.sigmoid(self.linear(h)).movedim(-1, self.channel_dim)


def combine(kind: str, skip: torch.Tensor, branch_out: torch.Tensor, alpha: torch.Tensor | None = None,
            gate: nn.Module | None = None) -> torch.Tensor:
    """The output of a `kind` block given its shortcut value and its branch's output."""
    if kind == "none":
        return branch_out
    if kind == "residual":
        return skip + branch_out
    if kind == "rezero":
        return skip + alpha * branch_out
    t = gate(skip)
    return branch_out * t + skip * (1 - t)


class ResidualBlock(nn.Module):
    """y = combine(F(x), P(x)) for one of RESIDUALS; see the module docstring."""

    def __init__(self, branch: nn.Module, kind: str = "residual", shortcut: nn.Module | None = None,
                 gate_features: int | None = None, highway_bias: float = -2.0, channel_dim: int = -1):
        super().__init__()
        if kind not in RESIDUALS:
            raise ValueError(f"unknown residual kind {kind!r}; allowed: {', '.join(RESIDUALS)}")
        self.kind = kind
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        if kind == "rezero":
            self.alpha = nn.Parameter(torch.zeros(()))
        if kind == "highway":
            if gate_features is None:
                raise ValueError("a highway block needs gate_features")
            self.gate = HighwayGate(gate_features, highway_bias, channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return self.branch(x)
        return combine(self.kind, self.shortcut(x), self.branch(x), getattr(self, "alpha", None),
                       getattr(self, "gate", None))
