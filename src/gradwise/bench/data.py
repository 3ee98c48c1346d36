"""data: epoch time of the Trainer's data loading against a plain DataLoader loop, 0 and 2 workers.

The dataset is read item by item with a CPU-bound, GIL-holding per-item
transform of about 2 ms (a pure-Python loop, calibrated at start), so only
worker processes can overlap it. Both sides train the same small MLP from the
same initial weights for one epoch with the same batch size and number of
workers, after one untimed warm-up epoch each: the plain side is `for x, y in DataLoader(...)`: zero_grad, forward,
backward, step; gradwise is `Trainer.fit` with `loader.num_workers`. Rounds
alternate which side goes first; the figure is the median per-round ratio.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gradwise.config import load_config
from gradwise.train import Trainer

ITEMS, BATCH, TRANSFORM_S = 512, 32, 0.002


def busy_loops(seconds: float) -> int:
    """Iterations of the transform's loop that take about `seconds` here."""
    n, t0 = 20_000, time.perf_counter()
    sum(i * i for i in range(n))
    return max(1, int(n * seconds / (time.perf_counter() - t0)))


class SlowItems(Dataset):
    def __init__(self, loops: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(ITEMS, 32, generator=g), torch.randint(0, 4, (ITEMS,), generator=g)
        self.loops = loops

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int):
        sum(j * j for j in range(self.loops))  # the per-item transform
        return self.x[i], self.y[i]


def plain_epoch(model: nn.Module, data: Dataset, workers: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def run(steps: int = 300, repeats: int = 5) -> dict[str, Any]:
    loops = busy_loops(TRANSFORM_S)
    data = SlowItems(loops)
    torch.manual_seed(0)
    initial = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    rows, raw = [], {}
    for workers in (0, 2):
        cfg = load_config(None, [f"train.steps={ITEMS // BATCH}", f"train.batch_size={BATCH}", "optim.lr=1e-3",
                                 "schedule.name=constant", "log.progress=off", "log.plots=false",
                                 "diagnostics.every=0", f"loader.num_workers={workers}"])

        def time_trainer() -> float:
            trainer = Trainer(copy.deepcopy(initial), data, config=cfg)
            t0 = time.perf_counter()
            trainer.fit()
            return time.perf_counter() - t0

        def time_plain() -> float:
            model = copy.deepcopy(initial)
            t0 = time.perf_counter()
            plain_epoch(model, data, workers)
            return time.perf_counter() - t0

        time_trainer(), time_plain()  # untimed warm-up: first-call costs (lazy imports, allocator, worker start-up)
        times: dict[str, list[float]] = {"gradwise": [], "plain": []}
        for r in range(max(3, repeats)):
            order = (("gradwise", time_trainer), ("plain", time_plain))
            for name, timer in (order if r % 2 == 0 else order[::-1]):
                times[name].append(timer())
        ratios = sorted(g / p for g, p in zip(times["gradwise"], times["plain"]))
        raw[f"{workers} workers"] = {**times, "ratios": ratios}
        rows.append({"workers": workers, "plain s/epoch": statistics.median(times["plain"]),
                     "gradwise s/epoch": statistics.median(times["gradwise"]),
                     "ratio gradwise/plain (median of rounds)": statistics.median(ratios),
                     "round ratios": f"{ratios[0]:.3f}..{ratios[-1]:.3f}"})
    return {"items": ITEMS, "batch": BATCH, "transform_s": TRANSFORM_S, "loops": loops, "rows": rows, "raw": raw,
            "notes": [f"{ITEMS} items of ~{TRANSFORM_S * 1e3:.0f} ms each (a GIL-holding Python loop), batch {BATCH}, "
                      "one epoch per side per round; ratio < 1 means gradwise was faster."]}
