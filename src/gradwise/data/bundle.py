"""`DataBundle`, the splits and the validation carve-out that every loader shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import TensorDataset

from gradwise.errors import DataError

Task = Literal["classification", "language_model"]


@dataclass
class DataBundle:
    """Train/test (and optional validation) splits and the facts a model needs about them."""

    train: TensorDataset
    test: TensorDataset
    task: Task
    num_classes: int  # classes, or vocabulary size for a language model
    input_shape: tuple[int, ...]  # one sample's input shape
    info: dict = field(default_factory=dict)  # e.g. the vocabulary, source files
    val: TensorDataset | None = None  # carved from the training split (`data.val_fraction`)


def classification_bundle(
    x_train, y_train, x_test, y_test, info: dict | None = None
) -> DataBundle:
    """Wrap arrays as float32 inputs and int64 labels."""
    xs = [torch.as_tensor(a, dtype=torch.float32) for a in (x_train, x_test)]
    ys = [torch.as_tensor(a, dtype=torch.int64) for a in (y_train, y_test)]
    if not len(ys[0]):
        raise DataError(f"data error: the training split of {(info or {}).get('source', 'the data')} is empty "
                        f"({len(ys[1])} test samples); give it more samples or a larger training fraction")
    num_classes = int(max(int(ys[0].max()), int(ys[1].max()) if len(ys[1]) else 0)) + 1
    return DataBundle(
        train=TensorDataset(xs[0], ys[0]),
        test=TensorDataset(xs[1], ys[1]),
        task="classification",
        num_classes=num_classes,
        input_shape=tuple(xs[0].shape[1:]),
        info=info or {},
    )


def split_indices(n: int, test_fraction: float, seed: int, key: str = "data.test_fraction"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded shuffle of range(n) cut into (train, test) index tensors; a cut that leaves no training sample
    is a DataError naming `key` (the fraction's config key)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        raise DataError(f"data error: {key}={test_fraction} of {n} samples leaves no training samples (allowed: a "
                        f"fraction below {(n - 1) / n:.4g} here)")
    return order[n_test:], order[:n_test]


def carve_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """Move a seeded `fraction` of the training samples into `bundle.val`; the test split is untouched."""
    if fraction <= 0:
        return bundle
    n = len(bundle.train)
    if n < 2:
        raise DataError(f"data error: data.val_fraction={fraction} needs at least 2 training samples, found {n}")
    train_idx, val_idx = split_indices(n, fraction, seed, "data.val_fraction")
    tensors = bundle.train.tensors
    bundle.train = TensorDataset(*(t[train_idx] for t in tensors))
    bundle.val = TensorDataset(*(t[val_idx] for t in tensors))
    return bundle
