"""The step engine: one update from one batch, and nothing else (no files, no logging, no loop).

A step is two calls:

    loss, finite = engine.gradients(batch)   zero_grad; per micro-batch (inside the strategy's
                                             `micro_batch(last)`: DDP/FSDP reduce in the last backward):
                                             forward under the precision, loss weights, penalty, backward;
                                             then unscale and check (fp16 overflow), or the finiteness check
                                             naming the layer
    engine.update(finite)                    clip once, optimizer and schedule (skipped when not finite);
                                             the precision settles (the fp16 scale grows or backs off)

`train_step` is the two in a row. Single-process, data-parallel and sharded training run it with their
`GradientSync` strategy (gradwise.parallel); the parameter server's worker calls `gradients` and pushes, its
server calls `update`, and the delay simulator calls both around stale weights (gradwise.asynchronous).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.config import Config
from gradwise.diagnostics.health import first_nonfinite_forward, last_nonfinite_grad
from gradwise.errors import ArgumentTypeError, ArgumentValueError, ConfigError
from gradwise.memory.accumulation import micro_batch_slices
from gradwise.memory.checkpointing import apply_checkpointing
from gradwise.memory.precision import Precision
from gradwise.optim import build_optimizer, build_scheduler, scaled_lr
from gradwise.optim.penalties import penalised_params, penalty
from gradwise.parallel.strategy import GradientSync, SingleProcess
from gradwise.train.batch import (batch_loss, call_model, count_items, default_count_fn, describe, logits, rows, split,
                                  tensors)
from gradwise.train.compilation import compile_forward


class NonFiniteStep(Exception):
    """Raised inside a step whose loss or gradients are not finite; `where` names the culprit layer.

    The engine does not count steps: whoever runs the loop sets `step` (the update that failed).
    """

    def __init__(self, where: str | None, stage: str, step: int | None = None):
        self.where, self.stage, self.step = where, stage, step
        super().__init__(where, stage)

    def __str__(self) -> str:
        return f"non-finite {self.stage} at step {self.step}: first appeared in '{self.where or 'unknown'}'"


def default_loss(outputs: Any, targets: Any) -> torch.Tensor:
    """Mean cross-entropy over every position: (B, C) logits for classification, (B, T, V) for a language model.

    `outputs` may carry its logits (`.logits`); a mapping batch's "labels" are the targets; -100 is ignored.
    """
    predictions = logits(outputs)
    if not isinstance(targets, torch.Tensor) and isinstance(targets, Mapping):
        targets = targets.get("labels")
    if not isinstance(predictions, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"the default loss (cross-entropy) needs logits and integer targets; got an output of "
                        f"{describe(outputs)} and a target of {describe(targets)}: pass loss_fn=, or return a .loss")
    if predictions.ndim == 2 and targets.ndim == 1:  # (B, C) and (B,): as they are
        return F.cross_entropy(predictions, targets)
    return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float] | None:
    """Each parameter group's lr by its `name` (else its index) when the groups were given different rates
    (their `initial_lr`, which torch's schedulers keep, else their lr); else None."""
    groups = optimizer.param_groups
    if len(groups) == 1 or len({g.get("initial_lr", g["lr"]) for g in groups}) == 1:
        return None
    return {str(g.get("name", i)): g["lr"] for i, g in enumerate(groups)}


def made_by(factory: Callable, name: str, argument: Any, kind: type | tuple[type, ...]) -> Any:
    """What `factory(argument)` returns, checked to be a `kind` (one line naming the argument otherwise)."""
    what = getattr(factory, "__name__", type(factory).__name__)
    given = "model" if name == "optimizer" else "optimizer"
    if isinstance(factory, type):
        raise ArgumentTypeError(f"argument error: {name}={what} is a class; pass an instance, or a factory such as "
                                f"`lambda {given}: {what}(...)`")
    try:
        made = factory(argument)
    except Exception as err:  # noqa: BLE001 - the user's factory failing on the call is bad input, in one line
        line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ArgumentValueError(f"argument error: {name}={what} failed when called with the {given} "
                                 f"({type(err).__name__}: {line}); pass a function {given} -> torch {name}") from None
    if not isinstance(made, kind):
        raise ArgumentTypeError(f"argument error: the {name} factory {what} returned {type(made).__name__}; it must "
                                f"return a torch {name}")
    return made


class StepEngine:
    """Computes gradients and applies updates for `model` as the (resolved) config says.

    `optimizer`/`scheduler` default to the ones `cfg.optim`/`cfg.schedule` describe
    (the schedule's horizon, `cfg.schedule.total_steps`, is set by `gradwise.resolve`); either may be a factory:
    `optimizer(model)`, `scheduler(optimizer)`.
    `count_fn(targets)` counts a batch's loss-bearing items, which weight its
    micro-batches. `loss_scaling=False` builds no fp16 loss scaler (a parameter
    server applies gradients its workers already unscaled). `lr_factor` multiplies
    the scaled optim.lr, or a given optimizer's rates (an asynchronous run's `ps.lr_scale`).
    `forward_context` wraps each forward (e.g. an ActivationMeter's `track`: the planner's measurement).
    `updates=False` builds a gradients-only engine (no optimizer, no schedule: a parameter-server worker's,
    whose updates are the server's).
    """

    def __init__(self, model: nn.Module, cfg: Config, *, sync: GradientSync | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 count_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 optimizer: torch.optim.Optimizer | Callable | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | Callable | None = None, loss_scaling: bool = True,
                 lr_factor: float = 1.0, forward_context: Callable[[], Any] = contextlib.nullcontext,
                 updates: bool = True):
        if cfg.schedule.total_steps is None:
            raise ConfigError("config error: schedule.total_steps is unset; resolve the config first "
                              "(gradwise.resolve.resolve_config)")
        self.cfg = cfg
        self.sync = sync or SingleProcess()
        self.device = self.sync.device
        self.model = model.to(self.device)
        self.loss_fn = loss_fn or default_loss
        self.count_fn = count_fn or default_count_fn(model)
        self.forward_context = forward_context
        self.precision = Precision(cfg, self.device, loss_scaling)
        apply_checkpointing(self.model, cfg.memory.checkpoint, cfg.memory.modules)
        self.precision.prepare(self.model)
        self.forward_model = self.sync.prepare(self.model, cfg, self.precision)  # the model, or DDP around it
        if cfg.train.compile:
            self.forward_model = compile_forward(self.forward_model, cfg.train)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.lr = lr_factor * scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.schedule.base_batch,
                                        cfg.schedule.scale_rule)
        if callable(optimizer):  # a factory: called on the model as the strategy prepared it (FSDP: sharded)
            optimizer = made_by(optimizer, "optimizer", self.model, torch.optim.Optimizer)
        self.optimizer = optimizer or (build_optimizer(cfg.optim, self.model, self.lr) if updates else None)
        if callable(scheduler):  # a factory: called on the optimizer
            scheduler = made_by(scheduler, "scheduler", self.optimizer, (torch.optim.lr_scheduler.LRScheduler,
                                                                        torch.optim.lr_scheduler.ReduceLROnPlateau))
        self.scheduler = scheduler or (build_scheduler(cfg.schedule, self.optimizer, cfg.schedule.total_steps)
                                       if updates else None)
        if optimizer is not None and lr_factor != 1.0:  # a user's optimizer gets the source's factor too (async: 1/M)
            self.scale_lr(lr_factor)
        reg = cfg.regularize
        self.penalised = penalised_params(self.model, cfg.optim.exclude) if reg.l1 or reg.l2 else []
        self.last_penalty: torch.Tensor | None = None
        self._nonfinite_flag = torch.zeros(1, device=self.device)  # buffers for the per-step finiteness check
        self._unit_scale = torch.ones(1, device=self.device)

    # -- the step's two calls ----------------------------------------------------------------------------------

    def train_step(self, batch: Any, global_count: torch.Tensor | None = None) -> torch.Tensor:
        """One update on one batch (any structure: gradwise.train.batch); returns its mean loss (detached).

        Raises NonFiniteStep (before any update) when the loss or a gradient is not finite and
        `diagnostics.check_finite` is on; under fp16 loss scaling the scaler skips the update instead.
        """
        loss, finite = self.gradients(batch, global_count)
        self.update(finite)
        return loss

    def gradients(self, batch: Any, global_count: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """This batch's gradients in the parameters' `.grad` (reduced over the strategy's processes), unscaled;
        returns (the batch's mean loss, detached; whether the gradients are finite: False only for an fp16
        overflow, which the scaler skips; any other non-finite value raises NonFiniteStep naming the layer)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:  # a gradients-only engine
            for p in self.params:
                p.grad = None
        loss = self.compute_gradients(batch, global_count)
        grads = self.sync.local_gradients(self.params)
        finite = self.precision.unscale_and_check(grads, self.sync.shard_sum)
        if finite is None:  # nothing to unscale: the finiteness check
            if self.cfg.diagnostics.check_finite:
                self.check_finite(loss, grads, batch)
            finite = True
        return loss, finite

    def update(self, finite: bool = True) -> None:
        """Clip (once per update, on unscaled gradients), then step optimizer and schedule, unless the
        gradients are not `finite`; then the precision settles (the fp16 scale grows or backs off)."""
        if finite:
            tc = self.cfg.train
            if tc.clip_value is not None:
                torch.nn.utils.clip_grad_value_(self.params, tc.clip_value)
            if tc.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, tc.clip_norm, foreach=True)
            self.optimizer.step()
            self.scheduler.step()
        self.precision.settle(finite)

    def micro_batches(self, batch: Any, global_count: torch.Tensor | None = None
                      ) -> list[tuple[Any, torch.Tensor | None]]:
        """(micro-batch, loss weight) pairs; weight None when one process does not split the batch.

        When processes share the batch, the weights use the global batch's item count: `global_count`
        when the caller counted it, else the strategy reduces it.
        """
        tc = self.cfg.train
        shared = self.sync.world_size > 1
        if not shared and tc.micro_batches == 1:
            return [(batch, None)]
        n = rows(batch)
        slices = micro_batch_slices(n, tc.micro_batches, tc.micro_batch_size) or [slice(0, 0)]
        if not shared and len(slices) == 1:
            return [(batch, None)]
        parts = [split(batch, s, n) for s in slices]
        weights = self.sync.loss_weights([count_items(p, self.count_fn) for p in parts], global_count)
        return list(zip(parts, weights))

    def compute_gradients(self, batch: Any, global_count: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward over the batch's micro-batches; returns the batch's mean loss (detached).

        Each micro-batch's mean loss is weighted by its share of the batch's
        loss-bearing items, so the accumulated gradient equals the full batch's.
        The L1/L2 penalty joins the last micro-batch's objective (once per
        update, in fp32); the returned loss excludes it (see `last_penalty`).
        The strategy's `micro_batch(last)` context decides which backward passes communicate.
        """
        total = None
        micro = self.micro_batches(batch, global_count)
        for i, (part, weight) in enumerate(micro):
            last = i == len(micro) - 1
            with self.sync.micro_batch(self.forward_model, last):
                with self.forward_context(), self.precision.forward():
                    output = call_model(self.forward_model, part)
                    if self.sync.world_size > 1 and rows(part) == 0:  # an empty shard adds 0
                        loss = sum(t.sum() for t in tensors(output) if t.is_floating_point()) * 0.0
                    else:
                        loss = batch_loss(output, part, self.loss_fn)
                if weight is not None:
                    loss = loss * weight
                objective = loss
                if self.penalised and last:
                    extra = penalty(self.penalised, self.cfg.regularize.l1, self.cfg.regularize.l2)
                    objective = loss + extra
                    self.last_penalty = self.sync.shard_sum(extra.detach().clone().reshape(1))[0]  # FSDP: whole
                self.precision.backward(objective)
            total = loss.detach() if total is None else total + loss.detach()
        return total

    # -- checks and adjustments --------------------------------------------------------------------------------

    def check_finite(self, loss: torch.Tensor, grads: list[torch.Tensor], batch: Any) -> None:
        # one fused kernel flags any non-finite gradient (this process's `grads`: its shards) or loss (it
        # multiplies them by exactly 1.0), one host sync
        checked = [*grads, loss.detach().float().reshape(1)]
        found = self._nonfinite_flag.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(checked, found, self._unit_scale)
        if not bool(self.sync.shard_sum(found).item()):  # any process's shard
            return
        in_forward = first_nonfinite_forward(self.model, lambda: call_model(self.model, batch))
        if in_forward is not None:
            raise NonFiniteStep(in_forward, "activation in forward")
        if not bool(torch.isfinite(loss)):
            raise NonFiniteStep("loss", "loss")  # finite outputs, non-finite loss
        raise NonFiniteStep(last_nonfinite_grad(self.model), "gradient in backward")

    def grad_norm(self) -> float:
        """The global gradient norm (over every process's shards)."""
        grads = self.sync.local_gradients(self.params)
        if not grads:
            return 0.0
        squares = torch.stack(torch._foreach_norm(grads)).square().sum()  # this process's (shards')
        return float(self.sync.shard_sum(squares.reshape(1)).sqrt()[0])

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate, now and for the rest of the schedule."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        if hasattr(self.scheduler, "base_lrs"):  # e.g. ReduceLROnPlateau has none: it works from the group lr
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
