"""Measures of a network at initialisation (seed 000, 004):

- `jacobian_mean_sq_singular_value`: the mean squared singular value of the input-output
  Jacobian of the model's block stack (Bachlechner et al. 2020's measure; 1 for an identity,
  -> 0 when signals vanish with depth, -> inf when they explode), estimated from vector-Jacobian
  products with random unit probes: E[||v^T J||^2 / ||v||^2] = tr(J J^T) / d for v uniform on the sphere.
- `spectral_norms`: the largest singular value of every Linear weight by power iteration,
  each layer's Lipschitz constant (seed 004).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def block_input(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """What the model feeds its `blocks` for these inputs (the stem's or embeddings' output)."""
    captured: list[torch.Tensor] = []
    handle = model.blocks.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    return captured[0]


def jacobian_mean_sq_singular_value(blocks: nn.Module, h: torch.Tensor, probes: int = 8, seed: int = 0) -> float:
    """Mean squared singular value of d blocks(h) / d h, per sample, from `probes` random VJPs."""
    h = h.detach().requires_grad_(True)
    return probed_mean_sq_singular_value(blocks(h), h, probes, seed)


def probed_mean_sq_singular_value(out: torch.Tensor, h: torch.Tensor, probes: int = 8, seed: int = 0) -> float:
    """Mean squared singular value of d out / d h (h a leaf `out` was computed from), per sample, from `probes`
    random VJPs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    values = []
    for i in range(probes):
        v = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
        (vjp,) = torch.autograd.grad(out, h, v, retain_graph=i < probes - 1)
        per_sample = vjp.flatten(1).pow(2).sum(1) / v.flatten(1).pow(2).sum(1)
        values.append(per_sample.mean())
    return float(torch.stack(values).mean())


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return next((v for v in getattr(value, "values", lambda: [])() if isinstance(v, torch.Tensor)), None)


def chain_jacobian(first: nn.Module, last: nn.Module, forward: Callable[[], Any], probes: int = 8,
                   seed: int = 0) -> float:
    """`jacobian_mean_sq_singular_value` of the blocks from `first` to `last` of any model, inside its own forward
    (`forward()` runs the model on a batch): the hidden state entering `first` (its first positional argument, or
    `hidden_states=`) becomes the variable, the first tensor leaving `last` the output."""
    entered: list[torch.Tensor] = []
    left: list[torch.Tensor] = []

    def swap_in(_module, args, kwargs):
        if entered:
            return None
        if args and isinstance(args[0], torch.Tensor):
            entered.append(args[0].detach().requires_grad_(True))
            return (entered[0], *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            entered.append(kwargs["hidden_states"].detach().requires_grad_(True))
            return args, {**kwargs, "hidden_states": entered[0]}
        raise TypeError(f"{type(first).__name__} takes no hidden-state tensor to measure the Jacobian from")

    def capture(_module, _args, output):
        found = _first_tensor(output)
        if found is not None:
            left[:] = [found]

    handles = [first.register_forward_pre_hook(swap_in, with_kwargs=True), last.register_forward_hook(capture)]
    try:
        with torch.enable_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    if not entered or not left:
        raise TypeError(f"the forward never passed through {type(first).__name__} and {type(last).__name__}")
    return probed_mean_sq_singular_value(left[0], entered[0], probes, seed)


@torch.no_grad()
def spectral_norm(weight: torch.Tensor, iterations: int = 50, seed: int = 0) -> float:
    """Largest singular value of a 2-D weight by power iteration."""
    w = weight.detach().float().flatten(1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(w.shape[1], generator=g).to(w.device)
    v /= v.norm()
    for _ in range(iterations):
        u = w @ v
        u /= u.norm().clamp(min=1e-30)
        v = w.T @ u
        v /= v.norm().clamp(min=1e-30)
    return float((w @ v).norm())


def spectral_norms(model: nn.Module, iterations: int = 50) -> dict[str, float]:
    return {name: spectral_norm(m.weight, iterations) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
