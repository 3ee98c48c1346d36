"""Gradient health: per-layer gradient norm, weight norm and update/weight ratio, verdicts, and
naming the first layer where a non-finite value appeared.

The verdict is a pure function of the per-layer figures:

    exploding  some layer's gradient norm exceeds `exploding_norm`, or its update moved the
               weights by more than `exploding_update` of their norm in one step
    dead       some layer that took part in the step has a gradient of exactly zero while its weights
               are not zero, at this check and the one before (`zero_before`: a zero-initialised gate such
               as ReZero's alpha zeroes its branch's gradients only until the first update), and no layer's
               gradient is merely tiny (that would be a decay that underflowed: vanishing): no sample reaches
               it (dead ReLUs after too large a step, the loss stuck at the chance level); a layer the step
               never used (no gradient at all) is not counted
    vanishing  some layer's gradient norm is below `vanishing_ratio` times the largest layer's,
               or below `vanishing_norm` outright
    healthy    otherwise

Layers are the parameter tensors with two or more dimensions (weights), named
as in `named_parameters()`, in model order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from gradwise.optim.layerwise import local

REMEDIES = {
    "vanishing": "use residual or ReZero blocks (model.residual=rezero), normalisation (model.norm=layer), "
                 "or kaiming/orthogonal init (model.init=kaiming)",
    "exploding": "clip gradients (train.clip_norm=1.0), lower optim.lr, add warmup (schedule.warmup_steps), "
                 "or normalise (model.norm=layer)",
    "dead": "lower optim.lr, add warmup (schedule.warmup_steps) or clip (train.clip_norm=1.0); under "
            "asynchronous training stale gradients make the safe lr smaller (docs/async.md)",
    "healthy": "",
}


@dataclass
class LayerStat:
    name: str
    grad_norm: float
    weight_norm: float
    update_ratio: float | None = None  # ||w_after - w_before|| / ||w_before||
    used: bool = True  # False: the step gave this layer no gradient at all (p.grad is None)


@dataclass
class Verdict:
    verdict: str  # healthy | vanishing | dead | exploding
    layers: list[str]
    remedy: str

    def as_dict(self) -> dict:
        return asdict(self)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]


def layer_stats(model: nn.Module, before: list[torch.Tensor] | None = None,
                shard_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[LayerStat]:
    """Per-layer norms from the current gradients (one host sync); update ratios if `before` weights are given.
    Sharded parameters (FSDP): each process's squared norms are added up by `shard_sum` (one all-reduce)."""
    layers = weight_layers(model)
    if not layers:
        return []
    weights = [local(p.detach()) for _, p in layers]
    grads = [local(p.grad) if p.grad is not None else torch.zeros_like(w) for (_, p), w in zip(layers, weights)]
    parts = [grads, weights]
    if before is not None:
        olds = [local(b) for b in before]
        parts += [torch._foreach_sub(weights, olds), olds]
    squares = torch.stack([torch.stack(torch._foreach_norm(part)).float() ** 2 for part in parts])
    norms = (shard_sum(squares) if shard_sum is not None else squares).sqrt()
    if before is not None:
        norms = torch.cat([norms[:2], (norms[2] / norms[3].clamp(min=1e-30)).unsqueeze(0)])
    values = norms.cpu().tolist()
    return [
        LayerStat(name, values[0][i], values[1][i], values[2][i] if before is not None else None, p.grad is not None)
        for i, (name, p) in enumerate(layers)
    ]


def zero_gradient_layers(stats: list[LayerStat]) -> set[str]:
    """Layers the step used whose gradient is exactly zero while their weights are not."""
    return {s.name for s in stats if s.used and s.grad_norm == 0 and s.weight_norm > 0}


def judge(stats: list[LayerStat], vanishing_ratio: float = 1e-4, vanishing_norm: float = 1e-10,
          exploding_norm: float = 1e3, exploding_update: float = 1.0,
          zero_before: set[str] | frozenset = frozenset()) -> Verdict:
    """Classify per-layer figures as exploding, dead, vanishing or healthy, naming the layers involved.
    `zero_before`: the previous check's `zero_gradient_layers` (dead needs two checks in a row)."""
    if not stats:
        return Verdict("healthy", [], "")
    exploding = [s.name for s in stats if s.grad_norm > exploding_norm
                 or (s.update_ratio is not None and s.update_ratio > exploding_update)]
    if exploding:
        return Verdict("exploding", exploding, REMEDIES["exploding"])
    zero = zero_gradient_layers(stats) & set(zero_before)
    dead = [s.name for s in stats if s.name in zero]
    fading = any(0 < s.grad_norm < vanishing_norm for s in stats)  # a gradual decay that underflowed: vanishing
    if dead and not fading:
        return Verdict("dead", dead, REMEDIES["dead"])
    largest = max(s.grad_norm for s in stats)
    vanishing = [s.name for s in stats if s.grad_norm < max(vanishing_norm, vanishing_ratio * largest)]
    if vanishing:
        return Verdict("vanishing", vanishing, REMEDIES["vanishing"])
    return Verdict("healthy", [], "")


def first_nonfinite_forward(model: nn.Module, forward: Callable[[], Any]) -> str | None:
    """Run `forward()` (a pass of `model`) with hooks; the name of the first leaf module whose output is not finite."""
    found: list[str] = []
    handles = []

    def hook(name):
        def check(module, args, output):
            if not found and isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
                found.append(name)
        return check

    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def last_nonfinite_grad(model: nn.Module) -> str | None:
    """The deepest parameter (model order) whose gradient is not finite: where backward first produced it."""
    culprit = None
    for name, p in model.named_parameters():  # a sharded gradient: this process's shard (no collective)
        if p.grad is not None and not bool(torch.isfinite(local(p.grad)).all()):
            culprit = name
    return culprit
