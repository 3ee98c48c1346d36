"""Deterministic batch order: a seeded permutation per epoch, addressed by (epoch, batch).

The permutation of epoch `e` is `torch.randperm(n, generator=Generator().manual_seed(epoch_seed(seed, e)))`,
so any position can be resumed without replaying earlier epochs, and a plain
loop can reproduce the order exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


@dataclass
class Position:
    """Where the next batch comes from."""

    epoch: int = 0
    batch: int = 0


class EpochBatches:
    """Yields index tensors batch by batch from a `Position`, crossing epochs as needed."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False, position: Position | None = None):
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.per_epoch = batches_per_epoch(n, batch_size, drop_last)
        if self.per_epoch < 1:
            raise ValueError(f"batch size {batch_size} exceeds {n} samples with drop_last")
        self.position = position or Position()
        self._perm_epoch, self._perm = -1, None

    def next(self) -> torch.Tensor:
        pos = self.position
        if self._perm_epoch != pos.epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.n, self.seed, pos.epoch), pos.epoch
        start = pos.batch * self.batch_size
        idx = self._perm[start : start + self.batch_size]
        pos.batch += 1
        if pos.batch == self.per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        return idx
