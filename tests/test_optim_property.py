"""Optimizers equal under every strategy, as a property: 41 configurations (40 drawn at random by
tests/optim_property_worker.py, and issue 31's LAMB one) trained in one process, under 2-process DDP and under
2-process FSDP (gloo), each strategy's final parameters within 1e-5 (relative) of one process's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from launching import torchrun

WORKER = str(Path(__file__).with_name("optim_property_worker.py"))
SEED, COUNT = "31", "40"


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in a) ** 0.5
    return float(num / sum((a[k].double() ** 2).sum() for k in a) ** 0.5)


def test_sgd_adamw_lars_and_lamb_match_one_process_under_ddp_and_fsdp_over_random_configurations(tmp_path):
    one = subprocess.run([sys.executable, WORKER, str(tmp_path / "one.pt"), SEED, COUNT], capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    single = torch.load(tmp_path / "one.pt")
    assert len(single) == int(COUNT) + 1 and {case.split("-")[1] for case in single if case[0].isdigit()} == \
        {"sgd", "adamw", "lars", "lamb"}  # every optimizer drawn
    for strategy in ("ddp", "fsdp"):
        assert torchrun(WORKER, str(tmp_path / f"{strategy}.pt"), SEED, COUNT, strategy) == 0
        group = torch.load(tmp_path / f"{strategy}.pt")
        gaps = {case: relative_gap(single[case], group[case]) for case in single}
        worst = max(gaps, key=gaps.get)
        assert gaps[worst] < 1e-5, (strategy, worst, gaps[worst])
