"""A two-input model fed dict batches: numeric features and a token sequence, one label.

    python examples/dict_model.py [--steps 300]

Each sample is {"x_num": float[8], "x_seq": int[12], "labels": int}. The
model is called as model(**batch) and returns logits; gradwise's default loss
(cross-entropy) reads batch["labels"], and accuracy is reported because the
logits are (B, C) and the labels (B,) integers.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import Dataset

from gradwise import Trainer, load_config


class Mixed(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x_num = torch.randn(n, 8, generator=g)
        self.x_seq = torch.randint(0, 50, (n, 12), generator=g)
        score = self.x_num[:, :2].sum(1) + (self.x_seq < 10).float().mean(1) * 4 - 1
        self.labels = (score > 0).long() + (score > 1.5).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x_num": self.x_num[i], "x_seq": self.x_seq[i], "labels": self.labels[i]}


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.numeric = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.tokens = nn.EmbeddingBag(50, 32)
        self.head = nn.Linear(64, 3)

    def forward(self, x_num, x_seq, labels=None):
        return self.head(torch.cat([self.numeric(x_num), self.tokens(x_seq)], dim=-1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(None, [f"train.steps={args.steps}", "train.batch_size=64", "optim.lr=0.003",
                             "train.eval_every=100", "log.progress=plain", "log.every=100"])
    summary = Trainer(TwoTower(), Mixed(4000, seed=0), test_data=Mixed(1000, seed=1), config=cfg).fit()
    print(f"test accuracy {summary['test_accuracy']:.3f} after {summary['steps']} steps")


if __name__ == "__main__":
    main()
