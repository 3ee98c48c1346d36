"""Mixed precision: autocast compute over fp32 master parameters, and dynamic loss scaling for fp16.

The scale update is a pure function (`next_scale`) with torch.amp.GradScaler's
semantics: on overflow multiply by `backoff_factor` and reset the clean-step
count; after `growth_interval` clean updates in a row multiply by `growth_factor`.
`LossScaler` wraps it with the unscale-and-check step. It works on any device
(the same code runs on CPU and CUDA).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch

from gradwise.config import ScalerConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """The autocast context for `precision` on `device` (a no-op for fp32)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def next_scale(scale: float, clean_steps: int, found_inf: bool, cfg: ScalerConfig) -> tuple[float, int]:
    """(new scale, new clean-step count) after one update."""
    if found_inf:
        return scale * cfg.backoff_factor, 0
    clean_steps += 1
    if clean_steps >= cfg.growth_interval:
        return scale * cfg.growth_factor, 0
    return scale, clean_steps


def grads_finite(grads: list[torch.Tensor]) -> bool:
    """True when every gradient element is finite (one host sync)."""
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


@dataclass
class LossScaler:
    """Dynamic loss scale for fp16: scale the loss, unscale and check the gradients, update the scale."""

    cfg: ScalerConfig
    scale: float = 0.0
    clean_steps: int = 0
    skipped_steps: int = 0

    def __post_init__(self) -> None:
        if not self.scale:
            self.scale = self.cfg.init_scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide gradients by the scale in place; return whether they are all finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        return grads_finite(grads)

    def update(self, found_inf: bool) -> None:
        self.skipped_steps += int(found_inf)
        self.scale, self.clean_steps = next_scale(self.scale, self.clean_steps, found_inf, self.cfg)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
