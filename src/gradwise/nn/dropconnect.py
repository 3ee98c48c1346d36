"""DropConnect (Wan et al. 2013): a linear layer that drops weights, not activations.

Training: each forward draws one Bernoulli mask M over the weight matrix
(keep probability 1 - p) and computes x (M * W)^T / (1 - p) + b. The scaling is
the inverted form, so the expected weight is W. (Wan et al. draw one mask per
example; one per mini-batch keeps the cost at a single matmul. The bias is not
masked.)

Inference:
    mean      the mean rule: x W^T + b, the expectation of the pre-activation.
    gaussian  moment matching: each pre-activation u is a sum of many masked
              terms, so u ~ N(mean, var) with mean = x W^T + b and
              var = p / (1 - p) * (x * x)(W * W)^T; the layer draws `samples`
              values of u, applies its activation to each and averages. This
              approximates E[act(u)], which the mean rule does not when act is
              nonlinear. Its noise comes from a private generator reseeded each
              call, so evaluation is deterministic and leaves the global RNG alone.

The activation that follows the layer belongs to it (`activation`), because
moment matching must average after the nonlinearity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INFERENCE_RULES = ("mean", "gaussian")


class DropConnectLinear(nn.Linear):
    """nn.Linear with DropConnect probability `p`, followed by `activation` (identity by default)."""

    def __init__(self, in_features: int, out_features: int, p: float, activation: nn.Module | None = None,
                 inference: str = "mean", samples: int = 32, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if not 0 <= p < 1:
            raise ValueError(f"DropConnect probability must be in [0, 1), got {p}")
        if inference not in INFERENCE_RULES:
            raise ValueError(f"unknown DropConnect inference {inference!r}; allowed: {', '.join(INFERENCE_RULES)}")
        self.p, self.inference, self.samples = p, inference, samples
        self.activation = activation if activation is not None else nn.Identity()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, inference={self.inference}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0:
            return self.activation(F.linear(x, self.weight, self.bias))
        if self.training:
            mask = torch.empty_like(self.weight).bernoulli_(1 - self.p)
            return self.activation(F.linear(x, self.weight * mask / (1 - self.p), self.bias))
        mean = F.linear(x, self.weight, self.bias)
        if self.inference == "mean" or isinstance(self.activation, nn.Identity):
            return self.activation(mean)  # for a linear output the Gaussian average is the mean itself
        var = self.p / (1 - self.p) * F.linear(x * x, self.weight * self.weight)
        generator = torch.Generator(device=x.device).manual_seed(0)
        noise = torch.randn((self.samples, *mean.shape), generator=generator, device=x.device, dtype=mean.dtype)
        return self.activation(mean + var.sqrt() * noise).mean(dim=0)
