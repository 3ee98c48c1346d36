"""Trains many random configurations of the optimizers, in one process or as one rank of a 2-process DDP or FSDP
group, and writes each run's final parameters: tests/test_optim_property.py compares the three.

    python tests/optim_property_worker.py OUT SEED COUNT                          one process, 1 torch thread
    torchrun --nproc-per-node 2 tests/optim_property_worker.py OUT SEED COUNT ddp|fsdp

Each configuration draws, from random.Random(SEED): SGD (momentum, Nesterov), AdamW, LARS or LAMB; MLP depth
and width (odd widths shard unevenly over 2 processes); weight decay; parameter groups (the default rule, every
tensor decayed and adapted, biases or a whole layer excluded); accumulation; clipping by norm or value; warmup;
batch size and length. The reference process computes with one torch thread, as each rank of the group does:
at two threads its reductions round differently, which LAMB's trust ratio amplifies (issue 31's configuration,
which comes first here, differs by 3e-2 between 1 and 2 threads in one process, and by 1e-7 at equal threads).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from gradwise import Trainer, load_config

COMMON = ["log.progress=off", "log.plots=false", "diagnostics.every=0", "train.eval_every=null",
          "train.checkpoint_every=null", "data.num_samples=700", "model.name=mlp"]
LR = {"sgd": "optim.lr=0.05", "adamw": "optim.lr=0.003", "lars": "optim.lr=0.5", "lamb": "optim.lr=0.01"}
ISSUE_31 = ["seed=5", "model.depth=4", "optim.name=lamb", "optim.lr=0.01", "optim.weight_decay=0.01",
            "train.batch_size=128", "train.steps=20"]


def configurations(seed: int, count: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    cases = {"issue-31-lamb-depth4-wd": ISSUE_31}
    for i in range(count):
        name = rng.choice(list(LR))
        args = [f"seed={rng.randrange(10_000)}", f"model.depth={rng.randint(1, 4)}",
                f"model.width={rng.choice([7, 13, 33, 64, 101])}", f"optim.name={name}", LR[name],
                f"optim.weight_decay={rng.choice([0, 0.01, 0.1])}", f"train.batch_size={rng.choice([32, 64, 96])}",
                f"train.steps={rng.randint(3, 8)}", f"schedule.warmup_steps={rng.choice([0, 2])}"]
        exclude = rng.choice([None, "[]", "['*.bias']", "['stem.*']"])
        if exclude is not None:
            args.append(f"optim.exclude={exclude}")
        args.append(f"train.accumulate={rng.choice([1, 1, 2, 4])}")
        clip = rng.choice([None, "train.clip_norm=0.5", "train.clip_norm=0.001", "train.clip_value=0.01"])
        args += [clip] if clip else []
        if name in ("sgd", "lars"):
            args.append(f"optim.momentum={rng.choice([0, 0.9])}")
            if name == "sgd" and "optim.momentum=0.9" in args and rng.random() < 0.5:
                args.append("optim.nesterov=true")
        cases[f"{i:02d}-{name}"] = args
    return cases


def whole(model) -> dict[str, torch.Tensor]:
    """The parameters, each gathered whole (a collective under FSDP)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.named_parameters()}


def main() -> None:
    out, seed, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    strategy = sys.argv[4] if sys.argv[4:] else None
    if strategy is None:
        torch.set_num_threads(1)  # what each rank of the group computes with
    results = {}
    for case, args in configurations(seed, count).items():
        extra = [f"train.strategy={strategy}"] if strategy else []
        trainer = Trainer.from_config(load_config(None, [*COMMON, *args, *extra]))
        trainer.fit()
        results[case] = whole(trainer.model)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
