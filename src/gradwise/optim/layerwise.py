"""Shared pieces of the layer-wise adaptive optimizers (LARS, LAMB): the trust ratio
as a pure, vectorised function, and fp32 views of possibly low-precision tensors."""

from __future__ import annotations

import torch


def trust_ratios(
    numerators: torch.Tensor,
    denominators: torch.Tensor,
    coefficient: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """coefficient * num / den per tensor, 1 where either norm is 0; at most `clip` when given.

    All inputs are 1-D tensors of per-tensor norms; no host synchronisation.
    """
    ratio = torch.where(
        (numerators > 0) & (denominators > 0),
        coefficient * numerators / denominators.clamp(min=torch.finfo(denominators.dtype).tiny),
        torch.ones_like(numerators),
    )
    if clip is not None:
        ratio = ratio.clamp(max=clip)
    return ratio


def as_fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors themselves when fp32, else fp32 copies (never modifies the originals)."""
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors)) if tensors else torch.zeros(0)


def write_back(params: list[torch.Tensor], params32: list[torch.Tensor]) -> None:
    """Copy updated fp32 copies into low-precision parameters (fp32 ones were updated in place)."""
    for p, p32 in zip(params, params32):
        if p is not p32:
            p.copy_(p32)
