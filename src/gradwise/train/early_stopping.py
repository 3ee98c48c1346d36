"""Early stopping on a validation metric, with the best weights kept for restoring.

`update(value, step, model)` is called after each evaluation: an improvement
(by more than `min_delta`, upwards when higher is better, as for accuracy or F1,
downwards otherwise) records the step and copies the weights; `patience` evaluations in a
row without one ask the loop to stop. The state, best weights included, goes
into checkpoints so a resumed run stops where an uninterrupted one would (the
weights as a model-shaped state, sharded under FSDP like the model).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradwise.config import EarlyStoppingConfig


class EarlyStopping:
    def __init__(self, cfg: EarlyStoppingConfig, higher_is_better: bool):
        self.cfg = cfg
        self.higher_is_better = higher_is_better
        self.best_value = -math.inf if self.higher_is_better else math.inf
        self.best_step: int | None = None
        self.bad_evaluations = 0
        self.stopped_at: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def improves(self, value: float) -> bool:
        delta = self.cfg.min_delta
        return value > self.best_value + delta if self.higher_is_better else value < self.best_value - delta

    def update(self, value: float, step: int, model: nn.Module) -> bool:
        """Record an evaluation; True when the run should stop now."""
        if self.improves(value):
            self.best_value, self.best_step, self.bad_evaluations = value, step, 0
            if self.cfg.restore_best:
                self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.bad_evaluations += 1
        if self.cfg.patience is not None and self.bad_evaluations >= self.cfg.patience:
            self.stopped_at = step
            return True
        return False

    def restore(self, model: nn.Module) -> bool:
        """Load the best weights into `model` (if restore_best kept any); True when it did."""
        if self.best_weights is None:
            return False
        model.load_state_dict(self.best_weights)
        return True

    def summary(self) -> dict[str, Any]:
        return {"metric": self.cfg.metric, "best_value": self.best_value if self.best_step is not None else None,
                "best_step": self.best_step, "stopped_at": self.stopped_at}

    def state_dict(self) -> dict[str, Any]:
        """The tracker's figures; the best weights, shaped like the model, are checkpointed beside the model
        (`model_states`, sharded with it under FSDP), not here."""
        return {"best_value": self.best_value, "best_step": self.best_step, "bad_evaluations": self.bad_evaluations,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The figures of `state_dict` (the best weights come back apart, with the model-shaped states)."""
        self.best_value, self.best_step = float(state["best_value"]), state["best_step"]
        self.bad_evaluations, self.stopped_at = int(state["bad_evaluations"]), state["stopped_at"]
