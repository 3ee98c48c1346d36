"""The data: byte sequences of the Python standard library's own sources, of varied lengths, padded per batch.

`build` returns what `data.factory` may: a dict of train, validation and test sets and the collate function
that batches them ({"input_ids", "attention_mask", "labels"}, padding labelled -100 so the loss skips it).
"""

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset

PAD = 0


class ByteLines(Dataset):
    """Sample i: the bytes at i * context, of a length between context / 2 and context (varied by i)."""

    def __init__(self, data: torch.Tensor, context: int):
        self.data, self.context = data, context

    def __len__(self) -> int:
        return len(self.data) // self.context

    def __getitem__(self, i: int) -> torch.Tensor:
        length = self.context // 2 + (i * 7919) % (self.context // 2 + 1)
        return self.data[i * self.context:i * self.context + length]


def pad_batch(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input ids, the attention mask, and labels with -100 on padding."""
    longest = max(len(s) for s in samples)
    ids = torch.full((len(samples), longest), PAD, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)], mask[row, :len(sample)] = sample, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def corpus(max_bytes: int) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:40])[:max_bytes]
    return torch.tensor(list(text), dtype=torch.long)


def build(context: int = 64, max_bytes: int = 200_000) -> dict:
    """80% of the corpus to train on, 10% validation, 10% test."""
    data = corpus(max_bytes)
    a, b = int(0.8 * len(data)), int(0.9 * len(data))
    return {"train": ByteLines(data[:a], context), "validation": ByteLines(data[a:b], context),
            "test": ByteLines(data[b:], context), "collate_fn": pad_batch}
