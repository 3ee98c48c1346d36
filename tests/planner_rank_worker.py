"""Run under torchrun by tests/test_distributed.py: `gradwise train` on each rank with memory.auto=true, where
each rank's planner trial timings are rigged to favour a different precision (rank 0: bf16, others: fp32).

Each rank writes the config it is about to train with to OUT/rank{R}.json; the run itself is the CLI's.
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


planner.profile_step = rigged_profile
Trainer.fit = recording_fit
sys.exit(main(sys.argv[1:]))
