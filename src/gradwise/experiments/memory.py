"""`gradwise repro memory`: what activation checkpointing and mixed precision buy on this machine.

1. Checkpoint policies on a 64-block MLP and on the character transformer:
   activation bytes kept for backward and step time, each relative to `none`.
2. Kept activation bytes against depth (4 ... 256 blocks) for none vs sqrt:
   O(n) against O(sqrt n) (Chen et al. 2016).
3. fp32 / bf16 / fp16 (dynamic loss scaling): step time and final test accuracy.

Step times alternate between the settings in rounds, and each ratio is the
median of per-round ratios, so slow spells of the machine hit all settings alike.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from gradwise.bench import describe_machine
from gradwise.bench.rounds import compare_policies, kept_bytes
from gradwise.config import load_config
from gradwise.io import write_json, write_text, write_with
from gradwise.memory.checkpointing import apply_checkpointing
from gradwise.memory.measure import format_bytes
from gradwise.nn import build_model
from gradwise.train import Trainer


def depth_curve(depths: list[int], width: int, batch: int) -> list[dict[str, Any]]:
    rows = []
    for blocks in depths:
        torch.manual_seed(0)
        cfg = load_config(None, ["model.name=mlp", f"model.depth={blocks + 1}", f"model.width={width}"])
        model = build_model(cfg.model, (40,), 10, "classification")
        x = torch.randn(batch, 40)
        row = {"blocks": blocks}
        for policy in ("none", "sqrt"):
            apply_checkpointing(model, policy)
            row[f"{policy}_bytes"] = kept_bytes(model, x)
        rows.append(row)
    return rows


def compare_precisions(overrides: list[str], steps: int) -> list[dict[str, Any]]:
    rows = []
    for precision in ("fp32", "bf16", "fp16"):
        cfg = load_config(None, ["log.progress=off", f"train.steps={steps}", f"train.eval_every={steps}",
                                 f"precision={precision}", *overrides])
        trainer = Trainer.from_config(cfg)
        t0 = time.perf_counter()
        summary = trainer.fit()
        seconds = time.perf_counter() - t0
        rows.append({"precision": precision, "ms_per_step": seconds / steps * 1e3,
                     "test_accuracy": summary["test_accuracy"], "test_loss": summary["test_loss"],
                     "skipped_steps": summary["skipped_steps"]})
    base = rows[0]["ms_per_step"]
    for row in rows:
        row["time_ratio_vs_fp32"] = row["ms_per_step"] / base
    return rows


def _table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key in columns:
            v = r[key]
            cells.append(format_bytes(v) if key.endswith("bytes") else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, title in ((axes[0], "mlp_policies", "64-block MLP"), (axes[1], "transformer_policies", "transformer")):
        rows = results[key]
        names = [r["policy"] for r in rows]
        ax.bar(names, [r["activation_bytes"] / 2**20 for r in rows], color="tab:blue")
        ax.set_ylabel("activations kept for backward (MiB)")
        twin = ax.twinx()
        twin.plot(names, [r["time_ratio_vs_none"] for r in rows], "o-", color="tab:red")
        twin.set_ylabel("step time / none", color="tab:red")
        ax.set_title(title)
    fig.tight_layout()
    write_with(out / "policies.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    rows = results["depth_curve"]
    blocks = [r["blocks"] for r in rows]
    for policy in ("none", "sqrt"):
        ax.loglog(blocks, [r[f"{policy}_bytes"] / 2**20 for r in rows], "o-", label=policy)
    ref = rows[-1]["none_bytes"] / 2**20
    ax.loglog(blocks, [ref * b / blocks[-1] for b in blocks], ":", color="gray", label="∝ n")
    ref = rows[-1]["sqrt_bytes"] / 2**20
    ax.loglog(blocks, [ref * math.sqrt(b / blocks[-1]) for b in blocks], "--", color="gray", label="∝ √n")
    ax.set_xlabel("blocks")
    ax.set_ylabel("activations kept (MiB)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    write_with(out / "memory_vs_depth.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)


def run(out_dir: str, quick: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    rounds, steps = (2, 2) if quick else (7, 5)
    mlp = ["model.name=mlp", "model.depth=65", "model.width=256", "train.batch_size=256", "optim.name=sgd"]
    transformer = ["data.name=text", "data.max_chars=300000", "model.name=transformer", "model.n_layer=8",
                   "model.d_model=128", "model.n_head=4", "model.context=128", "train.batch_size=32"]
    if quick:
        mlp[1], transformer[3] = "model.depth=17", "model.n_layer=2"
    precision = ["model.name=mlp", "model.depth=3", "model.width=512"]
    print("memory: checkpoint policies on the deep MLP ...", flush=True)
    results: dict[str, Any] = {"mlp_policies": compare_policies(mlp, rounds, steps)}
    print("memory: checkpoint policies on the transformer ...", flush=True)
    results["transformer_policies"] = compare_policies(transformer, rounds, max(1, steps // 2))
    print("memory: activation memory against depth ...", flush=True)
    results["depth_curve"] = depth_curve([4, 16, 64] if quick else [4, 16, 64, 256], 256, 256)
    print("memory: fp32 / bf16 / fp16 training ...", flush=True)
    results["precisions"] = compare_precisions(precision, 30 if quick else 1000)
    results["settings"] = {"mlp": mlp, "transformer": transformer, "precision": precision,
                           "rounds": rounds, "steps_per_round": steps, "quick": quick}


    results["machine"] = describe_machine()
    sqrt = next(r for r in results["mlp_policies"] if r["policy"] == "sqrt")
    bf16 = next(r for r in results["precisions"] if r["precision"] == "bf16")
    results["headline"] = {
        "mlp_memory_ratio_none_over_sqrt": sqrt["memory_ratio_none_over_policy"],
        "mlp_time_ratio_sqrt_over_none": sqrt["time_ratio_vs_none"],
        "bf16_time_ratio_vs_fp32": bf16["time_ratio_vs_fp32"],
    }
    policy_cols = {"policy": "checkpoint", "activation_bytes": "activations kept",
                   "memory_ratio_none_over_policy": "memory none/policy", "ms_per_step": "ms/step",
                   "time_ratio_vs_none": "time policy/none"}
    h = results["headline"]
    md = [
        "# repro memory",
        "",
        f"Machine: {results['machine']}" + (" (quick run: smaller models, fewer steps)" if quick else ""),
        "",
        f"Headline: on the deep MLP, sqrt checkpointing keeps **{h['mlp_memory_ratio_none_over_sqrt']:.1f}x** less "
        f"activation memory than none at **{h['mlp_time_ratio_sqrt_over_none']:.2f}x** the step time; "
        f"bf16 steps take **{h['bf16_time_ratio_vs_fp32']:.2f}x** the fp32 time.",
        "",
        "Activations kept for backward: bytes saved by autograd between forward and backward (saved-tensor hooks, "
        "each storage once, parameters excluded) plus the inputs that checkpointed segments hold. During backward a "
        "checkpointed segment is recomputed, so one segment's insides exist again for a moment.",
        "",
        f"## Checkpoint policies, MLP ({' '.join(mlp)})",
        "",
        _table(results["mlp_policies"], policy_cols),
        "",
        f"## Checkpoint policies, transformer ({' '.join(transformer)})",
        "",
        _table(results["transformer_policies"], policy_cols),
        "",
        "## Activation memory against depth (MLP width 256, batch 256)",
        "",
        _table(results["depth_curve"], {"blocks": "blocks", "none_bytes": "none", "sqrt_bytes": "sqrt"}),
        "",
        f"## Precision ({' '.join(precision)}, MNIST-1D)",
        "",
        _table(results["precisions"], {"precision": "precision", "ms_per_step": "ms/step",
                                       "time_ratio_vs_fp32": "time / fp32", "test_accuracy": "test accuracy",
                                       "skipped_steps": "skipped steps"}),
        "",
        "![policies](policies.png) ![depth](memory_vs_depth.png)",
        "",
    ]
    write_json(out / "results.json", results)
    write_text(out / "results.md", "\n".join(md))
    _plots(results, out)
    print("\n".join(md))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, plots")
    return results
