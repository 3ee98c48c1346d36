"""The training loop: data order, the step, evaluation, metrics, checkpoints and the run directory.

A step is the same three moves everywhere (see DESIGN.md): compute gradients,
synchronise them (nothing, for one process), apply the update. `Trainer` only
composes the pieces; the math lives in `gradwise.optim` and friends.

    trainer = Trainer(model, train_set, test_data=test_set, loss_fn=F.cross_entropy, out_dir="runs/a")
    summary = trainer.fit()
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from gradwise.config import Config, apply_overrides, read_yaml, validate
from gradwise.distributed.ddp import DistContext, wrap_model
from gradwise.diagnostics.health import (
    REMEDIES,
    first_nonfinite_forward,
    judge,
    last_nonfinite_grad,
    layer_stats,
    weight_layers,
)
from gradwise.errors import CheckpointError, ConfigError, NonFiniteError
from gradwise.io import write_json, write_text
from gradwise.memory.accumulation import item_count, loss_weights, micro_batch_slices
from gradwise.memory.checkpointing import apply_checkpointing
from gradwise.memory.precision import LossScaler, autocast
from gradwise.optim import build_optimizer, build_scheduler, scaled_lr
from gradwise.optim.penalties import penalised_params, penalty
from gradwise.train.early_stopping import EarlyStopping
from gradwise.train.metrics import MetricsLog, Progress, tensorboard_writer
from gradwise.train.sampler import EpochBatches, Position, batches_per_epoch
from gradwise.train.state import (
    capture_rng,
    check_model_state,
    load_checkpoint,
    params_sha256,
    restore_rng,
    save_checkpoint,
)

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
# Keys a resumed run may change: they alter how long it runs and what it reports, never its trajectory.
RESUMABLE_KEYS = ("train.steps", "train.epochs", "train.eval_every", "train.eval_batch_size",
                  "train.checkpoint_every", "log.")


class NonFiniteStep(Exception):
    """Raised inside a step whose loss or gradients are not finite; `where` names the culprit layer."""

    def __init__(self, step: int, where: str | None, stage: str):
        self.step, self.where, self.stage = step, where, stage
        super().__init__(f"non-finite {stage} at step {step}: first appeared in '{where or 'unknown'}'")


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: (B, C) logits for classification, (B, T, V) for a language model."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def _inputs_to_half(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.half() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fetch_batch(dataset: Dataset, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather samples `idx`: one indexing op per tensor for a TensorDataset, else collate item by item."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    return tuple(default_collate([dataset[i] for i in idx.tolist()]))


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


class Trainer:
    """Trains `model` on `train_data` (a Dataset of (input, target) pairs) as the config says.

    `val_data` (optional) is evaluated alongside `test_data` and is what
    early stopping watches; the test set never steers training. `optimizer` and `scheduler` default to the ones `config.optim` and
    `config.schedule` describe. `out_dir=None` trains without writing files.
    `task` selects the reported metric: accuracy for "classification",
    bits-per-char for "language_model". `count_fn(targets)` counts a batch's
    loss-bearing items, which weight micro-batches under accumulation (default:
    integer targets other than -100, else every target element).

    `dist` (a `DistContext`, set up by `gradwise train --nproc N` under
    torchrun) makes this one rank of synchronous data parallel training:
    `train.batch_size` stays the global batch, each rank computes gradients on
    its shard, DDP averages them, and rank 0 alone writes files.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        *,
        test_data: Dataset | None = None,
        val_data: Dataset | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        config: Config | None = None,
        out_dir: str | Path | None = None,
        task: str = "classification",
        count_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dist: DistContext | None = None,
    ):
        self.cfg = (config or Config()).model_copy(deep=True)
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.device = dist.device if dist is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.train_data, self.test_data, self.val_data = train_data, test_data, val_data
        self.loss_fn = loss_fn or default_loss
        self.count_fn = count_fn or item_count
        self.forward_context: Callable[[], Any] = contextlib.nullcontext  # e.g. an ActivationMeter's track()
        self.task = task
        self.out_dir = Path(out_dir) if out_dir is not None else None

        tc = self.cfg.train
        if len(train_data) < 1:
            raise ConfigError("config error: the training set is empty")
        if tc.drop_last and tc.batch_size > len(train_data):
            raise ConfigError(
                f"config error: train.batch_size={tc.batch_size} exceeds the {len(train_data)} training samples "
                f"with train.drop_last=true; use a batch of at most {len(train_data)}"
            )
        if dist is not None and tc.batch_size < dist.world_size:
            raise ConfigError(
                f"config error: train.batch_size={tc.batch_size} is smaller than the {dist.world_size} processes; "
                f"each process needs at least one sample (use train.batch_size >= {dist.world_size})"
            )
        self.steps_per_epoch = batches_per_epoch(len(train_data), tc.batch_size, tc.drop_last)
        self.total_steps = tc.steps if tc.steps is not None else tc.epochs * self.steps_per_epoch
        sc = self.cfg.schedule
        if sc.total_steps is None:
            sc.total_steps = self.total_steps  # the horizon is fixed for the life of the run
        if sc.warmup_epochs is not None:  # resolved once, like the horizon
            sc.warmup_epochs, sc.warmup_steps = None, round(sc.warmup_epochs * self.steps_per_epoch)
        self.lr = scaled_lr(self.cfg.optim.lr, tc.batch_size, sc.base_batch, sc.scale_rule)

        apply_checkpointing(self.model, self.cfg.memory.checkpoint, self.cfg.memory.modules)
        if self.cfg.master_weights == "fp16":  # pure fp16: weights, grads and optimizer state all in half
            self.model.half()
            self.model.register_forward_pre_hook(_inputs_to_half)
        self.forward_model = self.model  # what the step calls: the model, or DDP around it
        self.sync_gradients = True  # False skips DDP's all-reduce (ranks drift apart): for measuring comm cost only
        if dist is not None:
            if tc.sync_batchnorm and dist.backend != "nccl":
                raise ConfigError("config error: train.sync_batchnorm=true needs CUDA (torch's SyncBatchNorm has no "
                                  "CPU kernel); on CPU each process normalises over its own shard")
            self.forward_model = wrap_model(self.model, dist, tc.sync_batchnorm)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = LossScaler(self.cfg.scaler) if self.cfg.precision == "fp16" and self.cfg.scaler.enabled else None
        self.optimizer = optimizer or build_optimizer(self.cfg.optim, self.model, self.lr)
        self.scheduler = scheduler or build_scheduler(self.cfg.schedule, self.optimizer, self.total_steps)

        self.step = 0
        self.position = Position()
        self.elapsed_seconds = 0.0  # wall time of earlier sessions of this run
        self.samples_seen = 0
        self.window_losses: list[torch.Tensor] = []  # detached losses since the last log record
        self.window_carry = (0.0, 0)  # (sum, count) of a window that a resume split
        self.last_train_loss = float("nan")
        self.resumed_from: int | None = None
        self.rollbacks = 0
        self.restarts = 0  # elastic restarts of a data-parallel group (set by the launcher's workers)
        self._nonfinite_flag = torch.zeros(1, device=self.device)  # buffers for the per-step finiteness check
        self._unit_scale = torch.ones(1, device=self.device)
        self.health: dict[str, Any] | None = None  # the latest verdict
        self.records: list[dict[str, Any]] = []  # this session's metrics records, as written to metrics.jsonl

        reg = self.cfg.regularize
        self.penalised = penalised_params(self.model, self.cfg.optim.exclude) if reg.l1 or reg.l2 else []
        self.last_penalty: torch.Tensor | None = None
        es = self.cfg.early_stopping
        self.early_stopping = EarlyStopping(es) if es.patience is not None else None
        if self.early_stopping is not None:
            if val_data is None or len(val_data) == 0:
                raise ConfigError(
                    f"config error: early_stopping.patience={es.patience} needs a validation set; set "
                    "data.val_fraction (e.g. 0.1) or pass val_data (the test set is never used to stop)"
                )
            wanted = {"classification": "val_accuracy", "language_model": "val_bpc"}.get(task)
            if es.metric != "val_loss" and es.metric != wanted:
                raise ConfigError(
                    f"config error: early_stopping.metric={es.metric} is not reported for a {task} task "
                    f"(allowed: val_loss{', ' + wanted if wanted else ''})"
                )

    # -- construction from config / run directory ---------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Config, out_dir: str | Path | None = None, dist: DistContext | None = None) -> "Trainer":
        """Build data and model from the config (seeded by `cfg.seed`) and return a ready Trainer.

        Every rank builds the same model; ranks other than 0 then reseed, so dropout masks differ across shards.
        """
        from gradwise.data import build_data
        from gradwise.nn import build_model

        if cfg.memory.auto:
            from gradwise.memory.planner import plan_config

            cfg = plan_config(cfg)
        seed_everything(cfg.seed)
        data = build_data(cfg.data, context=cfg.model.context)
        model = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
        if dist is not None and dist.rank > 0:
            seed_everything(cfg.seed + 1_000_003 * dist.rank)
        return cls(model, data.train, test_data=data.test, val_data=data.val, config=cfg, out_dir=out_dir,
                   task=data.task, dist=dist)

    @staticmethod
    def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
        """The config of the run in `run_dir` with `overrides` applied (only keys that keep its trajectory)."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"checkpoint error: '{run_dir}' is not a run directory (no config.yaml)")
        overrides = list(overrides or [])
        for text in overrides:
            key = text.partition("=")[0]
            if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
                raise ConfigError(
                    f"config error: '{key}' cannot change on --resume (allowed: {', '.join(RESUMABLE_KEYS)}*)"
                )
        raw = read_yaml(run_dir / "config.yaml")
        keys = {text.partition("=")[0] for text in overrides}
        if "train.steps" in keys:
            raw.setdefault("train", {})["epochs"] = None
        if "train.epochs" in keys:
            raw.setdefault("train", {})["steps"] = None
        return validate(apply_overrides(raw, overrides))

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None,
               dist: DistContext | None = None) -> "Trainer":
        """Rebuild the run in `run_dir` from its config.yaml and checkpoints/last.pt, ready to continue."""
        run_dir = Path(run_dir)
        cfg = cls.resume_config(run_dir, overrides)
        payload = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        trainer = cls.from_config(cfg, out_dir=run_dir, dist=dist)
        trainer.load_state_dict(payload, where=str(run_dir / "checkpoints" / "last.pt"))
        stopped = trainer.early_stopping.stopped_at if trainer.early_stopping else None
        if stopped is not None:
            raise ConfigError(
                f"config error: the run in '{run_dir}' stopped early at step {stopped} "
                f"(early_stopping.patience={cfg.early_stopping.patience}); there is nothing to resume"
            )
        if trainer.step >= trainer.total_steps:
            raise ConfigError(
                f"config error: the checkpoint is at step {trainer.step} and the run is {trainer.total_steps} "
                f"steps long; pass train.steps=M with M > {trainer.step} to train further"
            )
        return trainer

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        window_total, window_count = self._window()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "position": {"epoch": self.position.epoch, "batch": self.position.batch},
            "rng": capture_rng(),
            "rng_ranks": self._gather(capture_rng()) if self.dist is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "early_stopping": self.early_stopping.state_dict() if self.early_stopping else None,
            "config": self.cfg.to_dict(),
            "progress": {
                "elapsed_seconds": self.elapsed_seconds,
                "samples_seen": self.samples_seen,
                "window_loss": window_total,
                "window_steps": window_count,
                "last_train_loss": self.last_train_loss,
            },
        }

    def load_state_dict(self, payload: dict[str, Any], where: str = "checkpoint") -> None:
        check_model_state(self.model, payload["model"], where)
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint error: '{where}' optimizer/scheduler state does not fit: {err}") from None
        self.model.load_state_dict(payload["model"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        if self.early_stopping is not None and payload.get("early_stopping"):
            self.early_stopping.load_state_dict(payload["early_stopping"])
        self.step = int(payload["step"])
        self.position = Position(int(payload["position"]["epoch"]), int(payload["position"]["batch"]))
        progress = payload.get("progress", {})
        self.elapsed_seconds = float(progress.get("elapsed_seconds", 0.0))
        self.samples_seen = int(progress.get("samples_seen", 0))
        self.window_losses = []
        self.window_carry = (float(progress.get("window_loss", 0.0)), int(progress.get("window_steps", 0)))
        self.last_train_loss = float(progress.get("last_train_loss", float("nan")))
        ranks = payload.get("rng_ranks")
        same_world = self.dist is not None and ranks is not None and len(ranks) == self.dist.world_size
        restore_rng(ranks[self.dist.rank] if same_world else payload["rng"])
        self.resumed_from = self.step

    # -- the step --------------------------------------------------------------------------------------------

    def micro_batches(self, inputs, targets, global_count: torch.Tensor | None = None
                      ) -> list[tuple[Any, torch.Tensor, torch.Tensor | None]]:
        """(inputs, targets, loss weight) per micro-batch; weight None when one process does not split the batch.

        Under data parallel the weights use the global batch's item count: `global_count` when the
        caller counted it, else one small all-reduce.
        """
        tc = self.cfg.train
        if self.dist is None and tc.micro_batches == 1:
            return [(inputs, targets, None)]
        slices = micro_batch_slices(len(targets), tc.micro_batches, tc.micro_batch_size) or [slice(0, 0)]
        if self.dist is None and len(slices) == 1:
            return [(inputs, targets, None)]
        counts = [self.count_fn(targets[s]) for s in slices]
        weights = self.dist.loss_weights(counts, global_count) if self.dist is not None else loss_weights(counts)
        return [(inputs[s], targets[s], w) for s, w in zip(slices, weights)]

    def compute_gradients(self, inputs, targets, global_count: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward over the batch's micro-batches; returns the batch's mean loss (detached).

        Each micro-batch's mean loss is weighted by its share of the batch's
        loss-bearing items, so the accumulated gradient equals the full batch's.
        The L1/L2 penalty joins the last micro-batch's objective (once per
        update, in fp32); the returned loss excludes it (see `last_penalty`).
        Under data parallel, DDP all-reduces during the last micro-batch's
        backward only (`no_sync` covers the others' forward and backward).
        """
        total = None
        micro = self.micro_batches(inputs, targets, global_count)
        for i, (x, y, weight) in enumerate(micro):
            last = i == len(micro) - 1
            skip_sync = self.dist is not None and not (last and self.sync_gradients)
            with self.forward_model.no_sync() if skip_sync else contextlib.nullcontext():
                with self.forward_context(), autocast(self.cfg.precision, self.device):
                    outputs = self.forward_model(x)
                    loss = self.loss_fn(outputs, y) if len(y) else outputs.sum() * 0.0  # an empty shard adds 0
                if weight is not None:
                    loss = loss * weight
                objective = loss
                if self.penalised and last:
                    extra = penalty(self.penalised, self.cfg.regularize.l1, self.cfg.regularize.l2)
                    objective = loss + extra
                    self.last_penalty = extra.detach()
                (self.scaler.scale_loss(objective) if self.scaler else objective).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def apply_update(self) -> bool:
        """Unscale, clip, step optimizer and scheduler; returns False when fp16 overflow skipped the update."""
        found_inf = self.scaler is not None and not self.scaler.unscale_(self.params)
        if not found_inf:
            tc = self.cfg.train
            if tc.clip_value is not None:
                torch.nn.utils.clip_grad_value_(self.params, tc.clip_value)
            if tc.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, tc.clip_norm, foreach=True)
            self.optimizer.step()
            self.scheduler.step()
        if self.scaler is not None:
            self.scaler.update(found_inf)
        return not found_inf

    def train_step(self, inputs, targets, global_count: torch.Tensor | None = None) -> torch.Tensor:
        """One update on one batch: compute gradients, (synchronise: nothing here), apply. Returns the loss.

        Raises NonFiniteStep (before any update) when the loss or a gradient is not finite and
        `diagnostics.check_finite` is on; under fp16 loss scaling the scaler handles overflow instead.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_gradients(inputs, targets, global_count)
        if self.cfg.diagnostics.check_finite and self.scaler is None:
            self._check_finite(loss, inputs)
        self.apply_update()
        return loss

    def _check_finite(self, loss: torch.Tensor, inputs) -> None:
        # one fused kernel flags any non-finite gradient (it multiplies them by exactly 1.0), one host sync
        grads = [p.grad for p in self.params if p.grad is not None]
        found = self._nonfinite_flag.zero_()
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._unit_scale)
        if not bool(found.add_(~torch.isfinite(loss.float())).item()):
            return
        in_forward = first_nonfinite_forward(self.model, inputs)
        if in_forward is not None:
            raise NonFiniteStep(self.step + 1, in_forward, "activation in forward")
        if not bool(torch.isfinite(loss)):
            raise NonFiniteStep(self.step + 1, "loss", "loss")  # finite outputs, non-finite loss
        raise NonFiniteStep(self.step + 1, last_nonfinite_grad(self.model), "gradient in backward")

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate, now and for the rest of the schedule."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]

    def _recover(self, event: NonFiniteStep, metrics: MetricsLog, progress: Progress) -> None:
        """Stop with a NonFiniteError, or roll back to the last checkpoint with a lower lr."""
        d = self.cfg.diagnostics
        if d.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{event}; the step was not applied. Set diagnostics.on_nonfinite=rollback to retry "
                f"from the last checkpoint with a lower lr, or: {REMEDIES['exploding']}"
            ) from None
        self._roll_back(event)
        metrics.write({"kind": "rollback", "step": event.step, "layer": event.where,
                       "to_step": self.step, "lr_factor": d.rollback_lr_factor})
        progress.message(f"{event}; rolled back to step {self.step}, lr x{d.rollback_lr_factor}")

    def _record_health(self, before: list[torch.Tensor], metrics: MetricsLog, progress: Progress) -> None:
        """Per-layer figures and a verdict for the step just taken; a message when it turns unhealthy."""
        d = self.cfg.diagnostics
        stats = layer_stats(self.model, before)
        verdict = judge(stats, d.vanishing_ratio, d.vanishing_norm, d.exploding_norm, d.exploding_update)
        if verdict.verdict != "healthy" and (self.health or {}).get("verdict") != verdict.verdict:
            progress.message(f"gradient health at step {self.step}: {verdict.verdict} in "
                             f"{', '.join(verdict.layers[:4])}; try: {verdict.remedy}")
        self.health = {"step": self.step, **verdict.as_dict()}
        metrics.write({"kind": "health", **self.health, "per_layer": [s.__dict__ for s in stats]})

    def _roll_back(self, event: NonFiniteStep) -> None:
        d = self.cfg.diagnostics
        path = self.out_dir / "checkpoints" / "last.pt" if self.out_dir is not None else None
        if self.rollbacks >= d.max_rollbacks or path is None or not path.is_file():
            why = (f"{self.rollbacks} rollbacks already (diagnostics.max_rollbacks={d.max_rollbacks})"
                   if self.rollbacks >= d.max_rollbacks else "no checkpoint to roll back to yet")
            raise NonFiniteError(f"{event}; {why}") from None
        resumed_from, rollbacks = self.resumed_from, self.rollbacks
        self.load_state_dict(load_checkpoint(path), where=str(path))
        self.resumed_from, self.rollbacks = resumed_from, rollbacks + 1
        self.scale_lr(d.rollback_lr_factor)

    def _scaler_metrics(self) -> dict[str, float]:
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.scale, "skipped_steps": self.scaler.skipped_steps}

    def _gather(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order (a collective: every rank must call it)."""
        import torch.distributed

        gathered: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def _window(self) -> tuple[float, int]:
        """(sum, count) of the training losses since the last log record (averaged over ranks: a collective)."""
        total, count = self.window_carry
        if self.window_losses:
            window = torch.stack(self.window_losses).sum()
            if self.dist is not None:
                window = self.dist.all_reduce_sum(window.reshape(1))[0] / self.dist.world_size
            total += float(window)
        return total, count + len(self.window_losses)

    def grad_norm(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    def evaluate_all(self) -> dict[str, float]:
        """`val_*` figures (when there is a validation set) and `test_*` figures."""
        result = self.evaluate(self.val_data, prefix="val") if self.val_data is not None else {}
        return {**result, **self.evaluate()}

    @torch.no_grad()
    def evaluate(self, dataset: Dataset | None = None, prefix: str = "test") -> dict[str, float]:
        """Mean loss (and accuracy or bits-per-char) over `dataset` (default: the test set), keys `prefix_*`."""
        dataset = dataset if dataset is not None else self.test_data
        if dataset is None or len(dataset) == 0:
            return {}
        was_training = self.model.training
        self.model.eval()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        n, bs = len(dataset), self.cfg.train.eval_batch_size
        part = self.dist.shard(n) if self.dist is not None else slice(0, n)  # each rank scores its share
        classify = self.task == "classification"
        for start in range(part.start, part.stop, bs):
            rows = torch.arange(start, min(part.stop, start + bs))
            inputs, targets = (t.to(self.device) for t in fetch_batch(dataset, rows))
            outputs = self.model(inputs)
            total_loss += self.loss_fn(outputs, targets) * len(targets)
            if classify and outputs.ndim == 2 and targets.ndim == 1:
                correct += (outputs.argmax(dim=-1) == targets).sum()
        self.model.train(was_training)
        if self.dist is not None:
            total_loss, correct = self.dist.all_reduce_sum(torch.stack([total_loss, correct]))
        result = {f"{prefix}_loss": float(total_loss) / n}
        if self.task == "language_model":
            result[f"{prefix}_bpc"] = result[f"{prefix}_loss"] / math.log(2)
        elif classify:
            result[f"{prefix}_accuracy"] = float(correct) / n
        return result

    # -- the loop --------------------------------------------------------------------------------------------

    def prepare_out_dir(self) -> None:
        """Create the run directory and write config.yaml (rank 0); an existing run there is an error."""
        if self.out_dir is None or not self.is_main:
            return
        if self.resumed_from is None and holds_run(self.out_dir):
            raise CheckpointError(
                f"checkpoint error: '{self.out_dir}' already holds a run; pass --resume {self.out_dir} "
                f"to continue it or choose another --out"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.out_dir / "config.yaml", self.cfg.to_yaml())

    def save_checkpoint(self) -> None:
        """Write checkpoints/last.pt (rank 0 writes; under data parallel every rank must call this)."""
        if self.out_dir is not None:
            payload = self.state_dict()
            if self.is_main:
                save_checkpoint(self.out_dir / "checkpoints" / "last.pt", payload)

    def fit(self) -> dict[str, Any]:
        """Train until `total_steps` updates; returns the summary (also written to summary.json)."""
        self.prepare_out_dir()
        out = self.out_dir
        cfg = self.cfg
        writes = out is not None and self.is_main
        board = tensorboard_writer(out / "tensorboard") if writes and cfg.log.tensorboard else None
        metrics = MetricsLog(out / "metrics.jsonl" if writes else None, resume_step=self.resumed_from,
                             tensorboard=board)
        self.records = metrics.records
        progress = Progress(cfg.log.progress if self.is_main else "off", self.total_steps, initial=self.step)
        if self.resumed_from is not None:
            progress.message(f"resuming from step {self.step} of {self.total_steps}")
        batches = EpochBatches(len(self.train_data), cfg.train.batch_size, cfg.seed, cfg.train.drop_last, self.position)
        session_start = time.perf_counter()
        window_start, window_samples = session_start, 0
        last_eval: dict[str, float] = {}
        diag = cfg.diagnostics
        self.model.train()
        try:
            while self.step < self.total_steps:
                idx = batches.next()
                mine, global_count = idx, None
                if self.dist is not None:
                    mine = idx[self.dist.shard(len(idx))]
                    if isinstance(self.train_data, TensorDataset):  # count the global batch's items here, no collective
                        global_count = self.count_fn(self.train_data.tensors[-1][idx]).to(self.device)
                inputs, targets = (t.to(self.device, non_blocking=True) for t in fetch_batch(self.train_data, mine))
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
                check_health = diag.every and (self.step + 1) % diag.every == 0
                before = [p.detach().clone() for _, p in weight_layers(self.model)] if check_health else None
                scale_before = self.scaler.scale if self.scaler is not None else None
                try:
                    loss = self.train_step(inputs, targets, global_count)
                except NonFiniteStep as event:
                    self._recover(event, metrics, progress)  # or raise NonFiniteError
                    batches = EpochBatches(len(self.train_data), cfg.train.batch_size, cfg.seed,
                                           cfg.train.drop_last, self.position)
                    continue
                self.step += 1
                self.window_losses.append(loss)
                if scale_before is not None and self.scaler.scale != scale_before:  # the loss scale's history
                    metrics.write({"kind": "scaler", "step": self.step, "scale": self.scaler.scale,
                                   "event": "overflow" if self.scaler.scale < scale_before else "growth"})
                if check_health:
                    self._record_health(before, metrics, progress)
                self.samples_seen += len(idx)
                window_samples += len(idx)
                progress.advance()
                last = self.step == self.total_steps
                if self.step % cfg.log.every == 0 or last:
                    now = time.perf_counter()
                    total, count = self._window()
                    self.last_train_loss = total / count
                    record = {
                        "kind": "train", "step": self.step,
                        "epoch": round(self.samples_seen / len(self.train_data), 4),
                        "train_loss": self.last_train_loss,
                        "lr": lr,
                        "grad_norm": self.grad_norm(),
                        **self._scaler_metrics(),
                        **({"penalty": float(self.last_penalty)} if self.last_penalty is not None else {}),
                        "samples_per_s": window_samples / max(now - window_start, 1e-9),
                        "time": round(self.elapsed_seconds + now - session_start, 3),
                    }
                    self.window_losses, self.window_carry = [], (0.0, 0)
                    window_start, window_samples = now, 0
                    metrics.write(record)
                    progress.show(record)
                stop = False
                if self.step % cfg.train.eval_every == 0 or last:
                    last_eval = self.evaluate_all()
                    if last_eval:
                        record = {"kind": "eval", "step": self.step, **last_eval}
                        metrics.write(record)
                        progress.show(record)
                    if self.early_stopping is not None:
                        stop = self.early_stopping.update(last_eval[cfg.early_stopping.metric], self.step, self.model)
                if self.step % cfg.train.checkpoint_every == 0 or last or stop:
                    self.elapsed_seconds += time.perf_counter() - session_start
                    session_start = time.perf_counter()
                    self.save_checkpoint()
                if stop:
                    es = self.early_stopping
                    progress.message(f"early stopping at step {self.step}: {cfg.early_stopping.metric} has not "
                                     f"improved for {es.bad_evaluations} evaluations (best {es.best_value:.4g} "
                                     f"at step {es.best_step})")
                    break
            if self.early_stopping is not None and self.early_stopping.restore(self.model):
                last_eval = self.evaluate_all()
                metrics.write({"kind": "eval", "step": self.step, "restored_from_step": self.early_stopping.best_step,
                               **last_eval})
        finally:
            progress.close()
            metrics.close()
        self.elapsed_seconds += time.perf_counter() - session_start
        summary = self.summary(last_eval)
        if out is not None and self.is_main:
            write_json(out / "summary.json", summary)
            if cfg.log.plots:
                from gradwise.train.plots import plot_run

                plot_run(metrics.records, out / "plots")
        return summary

    def summary(self, last_eval: dict[str, float]) -> dict[str, Any]:
        return {
            "final_train_loss": self.last_train_loss,
            **last_eval,
            "steps": self.step,
            "skipped_steps": 0,
            **self._scaler_metrics(),
            "epochs": round(self.samples_seen / len(self.train_data), 4),
            "wall_seconds": round(self.elapsed_seconds, 3),
            "samples_per_second": self.samples_seen / max(self.elapsed_seconds, 1e-9),
            "params_sha256": params_sha256(self.model),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "task": self.task,
            "resumed_from": self.resumed_from,
            "rollbacks": self.rollbacks,
            "world_size": self.dist.world_size if self.dist is not None else 1,
            "restarts": self.restarts,
            "health": self.health,
            **({"penalty": float(self.last_penalty)} if self.last_penalty is not None else {}),
            **({"early_stopping": self.early_stopping.summary()} if self.early_stopping else {}),
        }
