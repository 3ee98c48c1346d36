"""memory: checkpoint policies (activation memory and step-time ratios against no checkpointing) and
precision step-time ratios (bf16 and fp16 against fp32), each measured side by side in one run.

Policies run on a 32-block MLP (width 256, batch 256), the settings alternating
within each round (`gradwise.bench.rounds.compare_policies`; the full
experiment is `gradwise repro memory`). Precisions are timed on the default job
in alternating rounds too; each ratio is the median of per-round ratios.
"""

from __future__ import annotations

import statistics
from typing import Any

from gradwise.bench.rounds import compare_policies, time_rounds, variant_engines
from gradwise.memory.measure import format_bytes

MLP = ["model.name=mlp", "model.depth=33", "model.width=256", "train.batch_size=256", "optim.name=sgd"]
PRECISIONS = ("fp32", "bf16", "fp16")


def precision_times(overrides: list[str], steps: int, repeats: int) -> dict[str, list[float]]:
    def set_precision(name: str):
        return lambda cfg: setattr(cfg, "precision", name)

    engines, x, y = variant_engines(["diagnostics.every=0", *overrides], {p: set_precision(p) for p in PRECISIONS})
    # fp16 is emulated on CPUs: fewer steps
    return time_rounds(engines, x, y, repeats, lambda name: max(1, steps // 10) if name == "fp16" else steps)


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
