"""A streaming (iterable) dataset: samples generated on the fly, never held in memory as a whole.

    python examples/streaming.py [--steps 300] [--workers 2] [--out runs/stream]

The stream yields (x, y) pairs from a generator seeded per pass and split
across DataLoader workers by `get_worker_info()`, so every pass yields the same
items in the same order: a run can stop and resume exactly (`--out` twice).
`train.steps` sets the length (a stream has no epochs to count beforehand).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from gradwise import Trainer, load_config


class Signals(IterableDataset):
    """`n` noisy two-tone signals of 32 points; the label is which of 4 frequency pairs made them."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        g = torch.Generator().manual_seed(self.seed)
        t = torch.linspace(0, 1, 32)
        for i in range(self.n):
            label = int(torch.randint(0, 4, (1,), generator=g))
            noise = torch.randn(32, generator=g) * 2.0
            if i % workers == worker:  # each worker yields its share; all draw the same numbers
                wave = torch.sin(2 * torch.pi * (label + 1) * t) + torch.sin(6 * torch.pi * t * (label % 2 + 1))
                yield wave + noise, \
                    torch.tensor(label)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    cfg = load_config(None, [f"train.steps={args.steps}", "train.batch_size=64", "optim.lr=0.003",
                             f"loader.num_workers={args.workers}", "train.eval_every=100", "log.every=100",
                             "log.progress=plain"])
    trainer = Trainer(model, Signals(5000, seed=0), test_data=Signals(1000, seed=1), config=cfg, out_dir=args.out)
    summary = trainer.fit(resume=args.out is not None)
    print(f"test accuracy {summary['test_accuracy']:.3f} after {summary['steps']} steps, {summary['epochs']:.0f} "
          "full passes")


if __name__ == "__main__":
    main()
