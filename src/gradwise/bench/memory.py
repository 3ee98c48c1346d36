"""memory: checkpoint policies (activation memory and step-time ratios against no checkpointing) and
precision step-time ratios (bf16 and fp16 against fp32), each measured side by side in one run.

Policies run on a 32-block MLP (width 256, batch 256), the settings alternating
within each round (`gradwise.experiments.memory.compare_policies`; the full
experiment is `gradwise repro memory`). Precisions are timed on the default job
in alternating rounds too; each ratio is the median of per-round ratios.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

from gradwise.config import load_config
from gradwise.data import build_data
from gradwise.experiments.memory import compare_policies
from gradwise.memory.measure import format_bytes
from gradwise.nn import build_model
from gradwise.train import Trainer, seed_everything

MLP = ["model.name=mlp", "model.depth=33", "model.width=256", "train.batch_size=256", "optim.name=sgd"]
PRECISIONS = ("fp32", "bf16", "fp16")


def precision_times(overrides: list[str], steps: int, repeats: int) -> dict[str, list[float]]:
    cfg = load_config(None, ["log.progress=off", "diagnostics.every=0", *overrides])
    seed_everything(cfg.seed)
    data = build_data(cfg.data, context=cfg.model.context)
    initial = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    x, y = (t[: cfg.train.batch_size] for t in data.train.tensors)
    trainers = {}
    for precision in PRECISIONS:
        trial = cfg.model_copy(deep=True)
        trial.precision = precision
        trainers[precision] = Trainer(copy.deepcopy(initial), data.train, config=trial, task=data.task)
        trainers[precision].train_step(x, y)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(repeats):
        for precision in PRECISIONS:
            n = max(1, steps // 10) if precision == "fp16" else steps  # fp16 is emulated on CPUs: fewer steps
            t0 = time.perf_counter()
            for _ in range(n):
                trainers[precision].train_step(x, y)
            times[precision].append((time.perf_counter() - t0) / n)
    return times


def run(steps: int = 300, repeats: int = 5) -> dict[str, Any]:
    policy_steps = max(2, min(steps // 30, 10))
    policies = compare_policies(MLP, max(3, repeats), policy_steps)
    rows = [{"measure": f"checkpoint={p['policy']} (32-block MLP)", "activations kept": format_bytes(
        p["activation_bytes"]), "memory none/this": p["memory_ratio_none_over_policy"], "ms/step": p["ms_per_step"],
        "time this/reference": p["time_ratio_vs_none"]} for p in policies]
    times = precision_times([], max(10, min(steps, 100)), max(3, repeats))
    for precision in PRECISIONS:
        ratios = [t / f for t, f in zip(times[precision], times["fp32"])]
        rows.append({"measure": f"precision={precision} (default CNN job)", "activations kept": "-",
                     "memory none/this": "-", "ms/step": statistics.median(times[precision]) * 1e3,
                     "time this/reference": statistics.median(ratios)})
    return {"steps": steps, "repeats": repeats, "rows": rows, "raw": {"policies": policies, "precision_s": times},
            "notes": ["time this/reference: against checkpoint=none for policies, against fp32 for precisions; "
                      "medians of per-round ratios."]}
