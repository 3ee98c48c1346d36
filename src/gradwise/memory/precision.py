"""Mixed precision: autocast compute over fp32 master parameters, and dynamic loss scaling for fp16.

The scale update is a pure function (`next_scale`) with torch.amp.GradScaler's
semantics: on overflow multiply by `backoff_factor` and reset the clean-step
count; after `growth_interval` clean updates in a row multiply by `growth_factor`.
`LossScaler` holds the scale. `Precision` is the step engine's one plug-in for
all of it (fp32, bf16, fp16 with its scaler): the forward context, the backward,
unscaling and checking (possibly sharded) gradients, fp16 master weights, the
FSDP mixed-precision policy, its state in checkpoints. It works on any device
(the same code runs on CPU and CUDA).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from gradwise.config import Config, ScalerConfig
from gradwise.errors import ConfigError

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


@dataclass
class LossScaler:
    """Dynamic loss scale for fp16: scale the loss, update the scale (Precision unscales and checks)."""

    cfg: ScalerConfig
    scale: float = 0.0
    clean_steps: int = 0
    skipped_steps: int = 0

    def __post_init__(self) -> None:
        if not self.scale:
            self.scale = self.cfg.init_scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def update(self, found_inf: bool) -> None:
        self.skipped_steps += int(found_inf)
        self.scale, self.clean_steps = next_scale(self.scale, self.clean_steps, found_inf, self.cfg)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def _inputs_to_half(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.half() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class Precision:
    """`precision` (fp32, bf16, fp16) and `master_weights` as one plug-in of the step engine.

    `loss_scaling=False` keeps no fp16 loss scaler (a parameter server applies gradients its workers unscaled).
    Under fp16 with its scaler, `unscale_and_check` unscales each process's gradient shards and checks them in
    one fused kernel, then `shard_sum` (the strategy's) adds the overflow flags over the shards, so every
    process of a sharded group skips the same steps; without a scaler it returns None and the step engine
    runs its finiteness check instead.
    """

    def __init__(self, cfg: Config, device: torch.device, loss_scaling: bool = True):
        self.name, self.device, self.half_weights = cfg.precision, device, cfg.master_weights == "fp16"
        use_scaler = loss_scaling and cfg.precision == "fp16" and cfg.scaler.enabled
        self.scaler = LossScaler(cfg.scaler) if use_scaler else None
        self._found = torch.zeros(1, device=device)  # the overflow flag, reused every step

    def prepare(self, model: nn.Module) -> None:
        """fp16 master weights: the weights (so the gradients and optimizer state) in half, inputs cast to it."""
        if self.half_weights:
            model.half()
            model.register_forward_pre_hook(_inputs_to_half)

    def fsdp_policy(self) -> Any:
        """FSDP2's mixed-precision policy: bf16 compute over fp32 master shards, gradients reduced in fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy  # FSDP alone needs it (a slow import)

        if self.half_weights:
            raise ConfigError("config error: master_weights=fp16 is not supported with train.strategy=fsdp "
                              "(FSDP keeps fp32 master shards); use precision=bf16 or fp16 with fp32 masters")
        if self.name == "bf16":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def forward(self):
        """The context a forward runs in (autocast, or nothing for fp32)."""
        return autocast(self.name, self.device)

    def backward(self, objective: torch.Tensor) -> None:
        (self.scaler.scale_loss(objective) if self.scaler is not None else objective).backward()

    def unscale_and_check(self, local_grads: list[torch.Tensor],
                          shard_sum: Callable[[torch.Tensor], torch.Tensor]) -> bool | None:
        """fp16 with a scaler: unscale the gradients in place; whether every shard of every one is finite.
        Otherwise None (nothing to unscale)."""
        if self.scaler is None:
            return None
        found = self._found.zero_()
        if local_grads:
            inverse = torch.full((1,), 1.0 / self.scaler.scale, device=self.device)
            torch._amp_foreach_non_finite_check_and_unscale_(local_grads, found, inverse)
        return not bool(shard_sum(found).item())

    def settle(self, finite: bool) -> None:
        """After a step (applied, or skipped on overflow): the scale grows or backs off."""
        if self.scaler is not None:
            self.scaler.update(not finite)

    @property
    def scale(self) -> float | None:
        return self.scaler.scale if self.scaler is not None else None

    @property
    def skipped_steps(self) -> int:
        """Steps an fp16 overflow skipped (0 without a scaler)."""
        return self.scaler.skipped_steps if self.scaler is not None else 0

    def metrics(self) -> dict[str, float]:
        """The scaler's figures for metrics records: the loss scale and the skipped steps ({} without one)."""
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.scale, "skipped_steps": self.scaler.skipped_steps}

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
