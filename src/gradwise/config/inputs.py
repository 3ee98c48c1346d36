"""The config sections for what is trained: the data set and how it is loaded, and the built-in model."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from gradwise.config.section import Section

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
PositiveInt = Annotated[int, Field(gt=0, strict=True)]

# `package.module:callable` or `path/to/file.py:callable` (the callable may be an attribute path: `mod:Class.build`)
IMPORT_PATH = re.compile(r"^(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|[^:]+\.py):[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def check_import_path(key: str, value: Optional[str]) -> Optional[str]:
    """`value` checked; a file's path made absolute, so that a resume from another folder finds the file."""
    if value is None:
        return None
    if not IMPORT_PATH.match(value):
        raise ValueError(f"{key}={value!r} is not an import path (allowed: package.module:callable or "
                         "path/to/file.py:callable)")
    where, _, name = value.rpartition(":")
    return f"{os.path.abspath(where)}:{name}" if where.endswith(".py") else value


def refuse_builtin_keys(section: Section, key: str) -> None:
    """With `{key}.factory` set, a built-in key given away from its default would be silently ignored: refuse it."""
    ignored = [name for name in sorted(section.model_fields_set) if name not in section.FACTORY_KEYS
               and getattr(section, name) != type(section).model_fields[name].get_default(call_default_factory=True)]
    if ignored:
        name = ignored[0]
        raise ValueError(f"{key}.{name}={getattr(section, name)!r} is a key of the built-in {key}s, which "
                         f"{key}.factory={section.factory!r} replaces; pass what your factory takes as "
                         f"{key}.args.NAME=VALUE")


class DataConfig(Section):
    """Which data set to train on; see docs/data.md."""

    FACTORY_KEYS: ClassVar[tuple[str, ...]] = ("factory", "args")  # the keys that apply with data.factory

    name: Literal["mnist1d", "digits", "text", "npz", "csv"] = "mnist1d"
    factory: Optional[str] = Field(
        None, description="your data by import path (package.module:callable or file.py:callable), called with "
                          "data.args; returns a Dataset, a DataLoader, or a dict of train, val (or validation), "
                          "test and collate_fn (docs/your_model.md); replaces data.name")
    args: dict[str, Any] = Field(default_factory=dict, description="data.factory's keyword arguments")
    path: Optional[str] = Field(
        None, description="npz/csv file, or a text file or folder (text; default: the Python stdlib sources)"
    )
    num_samples: int = Field(5000, ge=10, le=10_000_000,
                             description="mnist1d: samples generated (train+test; at least 10, one per class)")
    train_split: float = Field(0.8, gt=0, lt=1, description="mnist1d: fraction used for training")
    generator_seed: int = Field(42, ge=0, le=SEED_MAX, description="mnist1d: generator seed (42 is the standard "
                                                                   "split); also the seed of every held-out split")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="digits/text/npz/csv: held-out fraction")
    val_fraction: float = Field(
        0.0, ge=0, lt=1, description="fraction of the training split held out for validation (never the test set)"
    )
    label_column: int = Field(-1, description="csv: index of the label column")
    max_chars: int = Field(2_000_000, gt=0, description="text: characters read from the corpus")
    cache_dir: Optional[str] = Field(None, description="where generated data is cached (default ~/.cache/gradwise)")

    @field_validator("factory")
    @classmethod
    def _factory_path(cls, value: Optional[str]) -> Optional[str]:
        return check_import_path("data.factory", value)

    @model_validator(mode="after")
    def _check_factory(self) -> "DataConfig":
        if self.factory is not None:
            refuse_builtin_keys(self, "data")
        elif self.args:
            raise ValueError(f"data.args={self.args!r} needs data.factory=package.module:callable (the built-in "
                             "data sets take data.NAME keys)")
        return self


class ModelConfig(Section):
    """Built-in model and its shape (docs/models.md), or yours by import path (docs/your_model.md)."""

    # the keys that apply with model.factory (context: the built-in text data's window, which yours may read)
    FACTORY_KEYS: ClassVar[tuple[str, ...]] = ("factory", "args", "loss", "context")

    name: Literal["cnn", "mlp", "transformer"] = "cnn"
    factory: Optional[str] = Field(
        None, description="your model by import path (package.module:callable or file.py:callable), called with "
                          "model.args, returning a torch.nn.Module (docs/your_model.md); replaces model.name")
    args: dict[str, Any] = Field(default_factory=dict, description="model.factory's keyword arguments")
    loss: Optional[str] = Field(
        None, description="model.factory: a loss function by import path, loss(output, target); default: the "
                          "model's own output.loss, else cross-entropy (gradwise.train.batch)")
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    residual: Optional[Literal["none", "residual", "rezero", "highway"]] = Field(
        None, description="block type; null: the model's default (mlp/cnn none, transformer residual)"
    )
    norm: Optional[Literal["none", "batch", "layer"]] = Field(
        None, description="normalisation in blocks; null: the model's default (mlp/cnn none, transformer layer)"
    )
    norm_position: Literal["pre", "post"] = Field("pre", description="transformer: LayerNorm before or after the sum")
    highway_bias: float = Field(-2.0, description="highway: initial gate bias (negative: mostly carry)")
    init: Literal["default", "xavier", "kaiming", "orthogonal"] = "default"
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability after each hidden layer (inverted)")
    dropconnect: float = Field(
        0.0, ge=0, lt=1, description="mlp/transformer: DropConnect probability on hidden linear layers' weights"
    )
    dropconnect_inference: Literal["mean", "gaussian"] = Field(
        "mean", description="DropConnect at inference: the mean rule, or Gaussian moment matching (Wan et al.)"
    )
    dropconnect_samples: int = Field(32, gt=0, description="gaussian inference: samples per unit")
    # MLP
    depth: int = Field(2, ge=1, le=10_000, description="mlp: hidden layers")
    width: int = Field(256, ge=1, description="mlp: hidden units per layer")
    # 1-D CNN (MNIST-1D reference family: stride-2 convs then a linear head)
    channels: list[PositiveInt] = Field(default_factory=lambda: [96, 96, 96, 96], min_length=1, max_length=10_000)
    kernel_sizes: list[PositiveInt] = Field(default_factory=lambda: [5, 3, 3, 3], min_length=1, max_length=10_000)
    # character transformer
    n_layer: int = Field(4, ge=1, le=10_000)
    d_model: int = Field(128, ge=1)
    n_head: int = Field(4, ge=1)
    context: int = Field(128, ge=2, description="transformer: tokens per window")

    @field_validator("factory", "loss")
    @classmethod
    def _import_paths(cls, value: Optional[str], info) -> Optional[str]:
        return check_import_path(f"model.{info.field_name}", value)

    @property
    def block_residual(self) -> str:
        if self.residual is not None:
            return self.residual
        return "residual" if self.name == "transformer" else "none"

    @property
    def block_norm(self) -> str:
        if self.norm is not None:
            return self.norm
        if self.name == "transformer":
            return "none" if self.residual == "rezero" else "layer"
        return "none"

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.factory is not None:
            refuse_builtin_keys(self, "model")
            return self
        if self.args or self.loss:
            raise ValueError(f"model.{'args' if self.args else 'loss'} needs model.factory=package.module:callable "
                             "(the built-in models take model.NAME keys)")
        if len(self.channels) != len(self.kernel_sizes):
            raise ValueError(
                f"model.channels has {len(self.channels)} entries but model.kernel_sizes has "
                f"{len(self.kernel_sizes)}; they must be the same length"
            )
        if self.block_residual == "rezero" and self.block_norm != "none":
            raise ValueError(
                f"model.residual=rezero uses no normalisation (alpha replaces it); got model.norm={self.block_norm}, "
                "set model.norm=none"
            )
        if self.name == "transformer" and self.block_norm == "batch":
            raise ValueError("model.norm=batch is not for the transformer (allowed there: none, layer)")
        if self.dropconnect and self.name == "cnn":
            raise ValueError(
                f"model.dropconnect={self.dropconnect} applies to hidden linear layers, which model.name=cnn has "
                "none of (allowed with: mlp, transformer); use model.dropout for the cnn"
            )
        if self.dropconnect and self.dropconnect_inference == "gaussian" and self.block_norm != "none" \
                and self.name == "mlp":
            raise ValueError(
                f"model.dropconnect_inference=gaussian needs the activation right after the layer, but "
                f"model.norm={self.block_norm} sits between them; use model.norm=none or dropconnect_inference=mean"
            )
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        return self


class LoaderConfig(Section):
    """Loading batches with torch's DataLoader machinery (0 workers: gathered in the training process)."""

    num_workers: int = Field(0, ge=0, description="worker processes preparing batches (a Dataset's __getitem__)")
    pin_memory: bool = Field(False, description="page-locked host memory for faster copies to a GPU")
    prefetch_factor: Optional[int] = Field(None, ge=1, description="batches each worker prepares ahead (torch: 2)")
    persistent_workers: bool = Field(False, description="torch's flag, passed on; training builds one loader per "
                                                        "fit (a stream: per pass), so it keeps nothing there; an "
                                                        "evaluation DataLoader of yours with it keeps its workers "
                                                        "between evaluations")

    @model_validator(mode="after")
    def _check(self) -> "LoaderConfig":
        if self.num_workers == 0 and (self.prefetch_factor is not None or self.persistent_workers):
            raise ValueError("loader.prefetch_factor and loader.persistent_workers need loader.num_workers >= 1")
        return self
