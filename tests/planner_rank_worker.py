"""Run under torchrun by tests/test_distributed.py: `gradwise train` on each rank with memory.auto=true, where
each rank's planner trial timings are rigged to favour a different precision (rank 0: bf16, others: fp32).
`user OUT`: the same for a Trainer of a model of the script's own (three repeated blocks).

Each rank writes the config it is about to train with to OUT/rank{R}.json; the run itself is the CLI's (or the
Trainer's).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import gradwise.tools.planner as planner
from gradwise.cli import main
from gradwise.train import Trainer

RANK = int(os.environ["RANK"])
FAVOURED = "bf16" if RANK == 0 else "fp32"
real_profile = planner.profile_step


def rigged_profile(engine, metering, batch, steps=3, warmup=1):
    """The real measurement, then a step time 10x longer for every precision but this rank's favourite."""
    prof = real_profile(engine, metering, batch, steps=steps, warmup=warmup)
    slow = 1.0 if engine.cfg.precision == FAVOURED else 10.0
    prof.seconds_per_step *= slow
    prof.samples_per_second /= slow
    return prof


real_fit = Trainer.fit


def recording_fit(self, *args, **kwargs):
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    (out / f"rank{RANK}.json").write_text(json.dumps(self.cfg.to_dict()))
    return real_fit(self, *args, **kwargs)


def users_run(out: str) -> int:
    import torch

    from gradwise.config import load_config

    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(3)))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), blocks, torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    cfg = load_config(None, ["train.steps=4", "train.batch_size=16", "memory.auto=true", "memory.budget=4GiB",
                             "log.progress=off", "diagnostics.every=0"])
    Trainer(model, data, config=cfg, out_dir=out).fit()
    return 0


planner.profile_step = rigged_profile
Trainer.fit = recording_fit
if sys.argv[1] == "user":
    out_dir = sys.argv[2]
    sys.argv[1:] = ["train", "--out", out_dir]  # where recording_fit writes
    sys.exit(users_run(out_dir))
sys.exit(main(sys.argv[1:]))
