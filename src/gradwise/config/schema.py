"""The config tree: one pydantic model per section, with defaults and cross-key checks.

Unknown keys are errors. Loading (YAML, overrides, one-line errors) is in
gradwise.config.loading; docs/config.md lists every key.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, field_validator, model_validator

from gradwise.config.inputs import SEED_MAX, DataConfig, LoaderConfig, ModelConfig
from gradwise.config.section import Section
from gradwise.config.units import parse_bytes


class OptimConfig(Section):
    """Optimizer; see docs/optim.md."""

    name: Literal["sgd", "adam", "adamw", "lars", "lamb"] = "adamw"
    lr: float = Field(0.01, gt=0, description="base lr (scaled by schedule.scale_rule)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and lars")
    nesterov: bool = Field(False, description="sgd only")
    weight_decay: float = Field(0.0, ge=0, description="not applied to excluded tensors (see exclude)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam/adamw/lamb: each in [0, 1)")
    eps: float = Field(1e-8, gt=0)
    trust_coefficient: float = Field(0.001, gt=0, description="lars: eta in eta*||w||/(||g||+wd*||w||)")
    trust_clip: Optional[float] = Field(None, gt=0, description="lars/lamb: cap on the trust ratio")
    exclude: Optional[list[str]] = Field(
        None, description="name patterns kept out of weight decay and layer adaptation (default: 1-D tensors)"
    )

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} must both lie in [0, 1) (torch's Adam refuses others)")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov=true needs optim.name=sgd and optim.momentum > 0")
        return self


class ScheduleConfig(Section):
    """Learning-rate schedule as a multiplier of optim.lr."""

    name: Literal["constant", "cosine", "poly", "step"] = "cosine"
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 over this many updates")
    warmup_epochs: Optional[float] = Field(None, gt=0, le=1e9, description="or: warmup over this many epochs")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/poly: final lr as a fraction of the peak")
    total_steps: Optional[int] = Field(
        None, gt=0, description="decay horizon; default: the run's length, fixed when the run starts"
    )
    power: float = Field(2.0, gt=0, description="poly: (1 - progress) ** power")
    step_every: Optional[int] = Field(None, gt=0, description="step: decay every N updates after warmup")
    gamma: float = Field(0.1, gt=0, le=1, description="step: multiply the lr by gamma at each decay")
    scale_rule: Literal["none", "linear", "sqrt"] = Field(
        "none", description="scale optim.lr by batch/base_batch (linear) or its square root (sqrt)"
    )
    base_batch: int = Field(256, gt=0, description="the batch size optim.lr is meant for")

    @model_validator(mode="after")
    def _check(self) -> "ScheduleConfig":
        if self.warmup_epochs is not None and self.warmup_steps:
            raise ValueError(
                f"schedule.warmup_steps={self.warmup_steps} and schedule.warmup_epochs={self.warmup_epochs} "
                "are both set; set only one"
            )
        if self.name == "step" and self.step_every is None:
            raise ValueError("schedule.name=step needs schedule.step_every=N")
        return self


class TrainConfig(Section):
    """Loop length, batch size, evaluation, checkpoints."""

    batch_size: int = Field(128, gt=0)
    steps: Optional[int] = Field(None, gt=0, description="optimizer updates; or set epochs")
    epochs: Optional[int] = Field(None, gt=0, description="passes over the training set; or set steps")
    drop_last: bool = Field(False, description="drop each epoch's last partial batch")
    eval_every: Optional[int] = Field(500, gt=0, description="evaluate (validation and test) every N steps and at "
                                                             "the end (null: at the end only)")
    eval_batch_size: int = Field(1000, gt=0)
    checkpoint_every: Optional[int] = Field(1000, gt=0, description="write checkpoints/last.pt every N steps and at "
                                                                     "the end (null: at the end only)")
    accumulate: int = Field(1, gt=0, description="micro-batches per update (micro-batch = batch_size / accumulate)")
    micro_batch_size: Optional[int] = Field(None, gt=0, description="or: samples per micro-batch")
    clip_norm: Optional[float] = Field(None, gt=0, description="clip the global gradient norm to this, once per update")
    clip_value: Optional[float] = Field(None, gt=0,
                                        description="clip each gradient element to [-v, v], once per update")
    sync_batchnorm: bool = Field(False, description="multi-process: BatchNorm statistics over the global batch (CUDA)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="the sync strategy (--strategy ddp|fsdp): one process, or under --nproc / torchrun ddp "
                           "(a full replica per process) or fsdp (parameters, gradients and optimizer state sharded "
                           "across processes: FSDP2)")
    compile: bool = Field(False, description="torch.compile the training forward (docs/speed.md: slower than eager "
                                             "for the built-in models on this CPU, measured)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="train.compile: torch.compile's mode")
    compile_backend: str = Field("inductor", description="train.compile: torch.compile's backend (e.g. inductor, "
                                                         "aot_eager, eager)")
    shard_modules: list[str] = Field(
        default_factory=list, description="fsdp: module classes sharded as units (default: each block of a "
                                          "built-in model, or your model's repeated blocks, e.g. GPT2Block); the "
                                          "root always is")

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, data: Any) -> Any:
        """3000 steps when neither train.steps nor train.epochs is given."""
        if isinstance(data, dict) and data.get("steps") is None and data.get("epochs") is None:
            return {**data, "steps": 3000}
        return data

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                f"train.steps={self.steps} and train.epochs={self.epochs} are both set; set only one"
            )
        if self.micro_batch_size is not None and self.accumulate != 1:
            raise ValueError(
                f"train.accumulate={self.accumulate} and train.micro_batch_size={self.micro_batch_size} "
                "are both set; set only one"
            )
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ValueError(f"train.compile_mode={self.compile_mode} needs train.compile_backend=inductor "
                             f"(got {self.compile_backend!r})")
        if self.accumulate > self.batch_size:
            raise ValueError(f"train.accumulate={self.accumulate} exceeds train.batch_size={self.batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"train.micro_batch_size={self.micro_batch_size} exceeds train.batch_size={self.batch_size}"
            )
        return self

    @property
    def micro_batches(self) -> int:
        """Micro-batches per full batch."""
        if self.micro_batch_size is not None:
            return -(-self.batch_size // self.micro_batch_size)
        return self.accumulate


CHECKPOINT_POLICY = re.compile(r"^(none|all|sqrt|every:[1-9][0-9]*)$")


class MemoryConfig(Section):
    """Activation checkpointing and the memory planner; see docs/memory.md."""

    checkpoint: str = Field("none", description="none | all | sqrt | every:K (segments of K blocks)")
    modules: list[str] = Field(
        default_factory=list, description="class names of modules to checkpoint (a user's own model)"
    )
    auto: bool = Field(False, description="let the planner pick micro-batch, checkpointing and precision")
    budget: Optional[str] = Field(None, description="memory budget for memory.auto, e.g. 2GiB, 500MB, or bytes")

    @field_validator("budget", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # a bare number

    @model_validator(mode="after")
    def _check(self) -> "MemoryConfig":
        if not CHECKPOINT_POLICY.match(self.checkpoint):
            raise ValueError(
                f"memory.checkpoint={self.checkpoint!r} is not a policy (allowed: none, all, sqrt, every:K with K >= 1)"
            )
        if self.auto and self.budget is None:
            raise ValueError("memory.auto=true needs memory.budget (e.g. memory.budget=2GiB)")
        if self.budget is not None:
            parse_bytes(self.budget, "memory.budget")
        return self


class RegularizeConfig(Section):
    """Penalties added to the training loss (Keras semantics); see docs/regularization.md.

    The penalised tensors are those optim.weight_decay applies to (optim.exclude).
    """

    l1: float = Field(0.0, ge=0, description="adds l1 * sum |w|")
    l2: float = Field(0.0, ge=0, description="adds l2 * sum w^2 (gradient 2 * l2 * w)")


class EarlyStoppingConfig(Section):
    """Stop when a validation metric stops improving; see docs/regularization.md."""

    patience: Optional[int] = Field(
        None, ge=1, description="evaluations without improvement before stopping (null: off)"
    )
    metric: str = Field(
        "val_loss", pattern=r"^val_[A-Za-z0-9_]+$",
        description="the validation metric watched: val_loss, val_accuracy, val_bpc, or val_NAME for a metric "
                    "of yours (Trainer(metrics={'NAME': ...}))"
    )
    mode: Optional[Literal["min", "max"]] = Field(
        None, description="min: lower is better, max: higher is better; null: inferred (loss and bpc min, accuracy "
                          "max, a metric object's higher_is_better)"
    )
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")
    restore_best: bool = Field(True, description="end the run with the weights of the best evaluation")


SLOWDOWN = re.compile(r"^\s*\d+\s*:\s*[0-9]*\.?[0-9]+\s*(,\s*\d+\s*:\s*[0-9]*\.?[0-9]+\s*)*$")


class PSConfig(Section):
    """Asynchronous parameter server (`gradwise train --strategy async`); see docs/async.md."""

    rule: Literal["asgd", "ssp", "staleness-aware", "dcasgd-c", "dcasgd-a", "ssgd"] = Field(
        "asgd", description="how the server applies a pushed gradient"
    )
    staleness: int = Field(2, ge=0, description="ssp: a worker may run at most this many clocks ahead of the slowest")
    dc_lambda: Optional[float] = Field(
        None, ge=0, description="dcasgd: lambda (dcasgd-c) or lambda0 (dcasgd-a); null: 0.04 / 2.0 (the paper's)"
    )
    lr_scale: Literal["inverse-workers", "none"] = Field(
        "inverse-workers", description="asgd, ssp, dcasgd-c/-a: optim.lr / M under M workers (stale gradients need "
                                       "a smaller step; docs/async.md); none: optim.lr as given"
    )
    ms_momentum: float = Field(0.95, ge=0, lt=1, description="dcasgd-a: mean-square smoothing m")
    mean_square: Literal["global", "per-worker"] = Field(
        "global", description="dcasgd-a: one mean square MS for every worker's gradients, or one per worker (as "
                              "Microsoft's Multiverso keeps it); the simulator's workers take turns")
    eps: float = Field(1e-7, gt=0, description="dcasgd-a: epsilon in lambda0 / sqrt(MS + eps)")
    slowdown: Optional[str] = Field(None, description='stragglers: "W:F[,W:F]" makes worker W F times slower')
    delay: str = Field("round-robin", description="--strategy simulate: each gradient's staleness: round-robin "
                                                  "(M-1), uniform (0..2(M-1)), or a Ray run's updates.jsonl / "
                                                  "summary.json (its measured staleness, drawn at random)")
    max_worker_restarts: int = Field(3, ge=0, description="times Ray restarts one dead worker before the run fails")
    worker_threads: Optional[int] = Field(
        None, ge=1, description="torch threads per worker; null: the driver's thread count shared among the M "
                                "workers (set when the run starts), so one worker computes as the driver would")

    @model_validator(mode="after")
    def _check(self) -> "PSConfig":
        if self.slowdown is not None and not SLOWDOWN.match(self.slowdown):
            raise ValueError(f"ps.slowdown={self.slowdown!r} must look like 2:3.0 or 1:2,3:4 (worker:factor)")
        return self

    def slowdowns(self) -> dict[int, float]:
        if not self.slowdown:
            return {}
        pairs = (item.split(":") for item in self.slowdown.split(","))
        return {int(w): float(f) for w, f in pairs}


class ScalerConfig(Section):
    """Dynamic loss scaling for precision=fp16 (ignored otherwise)."""

    enabled: bool = True
    init_scale: float = Field(2.0**16, gt=0)
    backoff_factor: float = Field(0.5, gt=0, lt=1)
    growth_factor: float = Field(2.0, gt=1)
    growth_interval: int = Field(2000, gt=0, description="clean updates before the scale grows")


class DiagnosticsConfig(Section):
    """Gradient health checks run during training; see docs/diagnostics.md."""

    every: int = Field(100, ge=0, description="per-layer health record every N steps (0: off)")
    vanishing_ratio: float = Field(1e-4, gt=0, description="a layer's grad norm below this x the largest: vanishing")
    vanishing_norm: float = Field(1e-10, ge=0, description="or below this outright")
    exploding_norm: float = Field(1e3, gt=0, description="a layer's grad norm above this: exploding")
    exploding_update: float = Field(1.0, gt=0, description="or one update moving it by more than this x its norm")
    check_finite: bool = Field(True, description="stop a step whose loss or gradient is not finite")
    on_nonfinite: Literal["stop", "rollback"] = Field(
        "stop", description="stop the run naming the layer, or roll back to the last checkpoint with a lower lr"
    )
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1)
    max_rollbacks: int = Field(3, ge=1)


class LogConfig(Section):
    """Progress output and plots."""

    progress: Literal["auto", "bar", "plain", "off"] = Field(
        "auto", description="auto: a bar on a terminal, plain lines otherwise"
    )
    every: int = Field(50, gt=0, description="log train metrics every N steps")
    plots: bool = True
    tensorboard: bool = Field(False, description="also write TensorBoard event files to RUN_DIR/tensorboard")


class Config(Section):
    """The whole run: every key gradwise reads."""

    seed: int = Field(0, ge=0, le=SEED_MAX, description="seeds every random draw (numpy's range: 0 to 2**32-1)")
    data: DataConfig = Field(default_factory=DataConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    master_weights: Literal["fp32", "fp16"] = Field(
        "fp32", description="fp16 only: fp16 keeps the weights (and optimizer state) in fp16 too; for experiments"
    )
    scaler: ScalerConfig = Field(default_factory=ScalerConfig)
    regularize: RegularizeConfig = Field(default_factory=RegularizeConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    ps: PSConfig = Field(default_factory=PSConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _check_master_weights(self) -> "Config":
        if self.data.factory is not None and self.model.factory is None:
            raise ValueError(f"data.factory={self.data.factory!r} needs model.factory=package.module:callable too "
                             "(the built-in models are built for the built-in data sets)")
        if self.master_weights == "fp16" and self.precision != "fp16":
            raise ValueError(f"master_weights=fp16 needs precision=fp16 (got precision={self.precision})")
        return self

    def frozen(self) -> "Config":
        """A read-only deep copy (what `gradwise.resolve.resolve_config` returns)."""
        copy = self.model_copy(deep=True)
        copy._set_frozen(True)
        return copy

    def thawed(self) -> "Config":
        """An editable deep copy."""
        copy = self.model_copy(deep=True)
        copy._set_frozen(False)
        return copy

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The config as YAML; a section whose factory names your model or data leaves out the built-in keys it
        replaces (their defaults come back when the file is read)."""
        tree = self.to_dict()
        for name in ("data", "model"):
            section = getattr(self, name)
            if section.factory is not None:
                tree[name] = {k: v for k, v in tree[name].items() if k in section.FACTORY_KEYS}
        return yaml.safe_dump(tree, sort_keys=False)
