"""`gradwise repro precision`: what do fp16 and bf16 cost in quality, and what do loss scaling and fp32
master weights buy? (seed 004; Micikevicius et al. 2018)

Two models, each trained five ways with everything else equal:

    fp32                      the reference
    bf16                      autocast bf16, fp32 master weights
    fp16 + dynamic scaling    autocast fp16, fp32 master weights, dynamic loss scale (gradwise's fp16 mode)
    fp16, no loss scaling     gradients that fall below 2^-24 flush to zero
    fp16 master weights       weights, gradients and optimizer state in fp16 (dynamic scaling kept): small
                              updates round away against their weight

Reported: final quality (test accuracy, or bits per character), the fraction
of gradient elements that are exactly zero on a fixed batch at the end (the
fp32 run's share is the structural baseline: dead ReLUs, unused embeddings),
skipped (overflow) steps, the final loss scale, and ms per step (on this CPU
fp16 is emulated and slow; bf16 has native kernels). Also the
`gradwise inspect precision` verdict for each model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from gradwise.bench import describe_machine
from gradwise.config import load_config
from gradwise.errors import NonFiniteError
from gradwise.io import write_json, write_text, write_with
from gradwise.tools.precision import inspect_precision
from gradwise.train import Trainer
from gradwise.train.batch import fetch_batch

MODELS = {
    "cnn": ["data.name=mnist1d", "data.num_samples=5000", "model.name=cnn", "model.channels=[32,32,32]",
            "model.kernel_sizes=[5,3,3]", "train.batch_size=128", "optim.name=sgd", "optim.lr=0.05",
            "optim.momentum=0.9", "schedule.name=cosine"],
    "transformer": ["data.name=text", "data.max_chars=300000", "model.name=transformer", "model.n_layer=2",
                    "model.d_model=64", "model.n_head=4", "model.context=64", "train.batch_size=16",
                    "optim.name=adamw", "optim.lr=0.003", "schedule.name=cosine", "schedule.warmup_steps=30"],
}
VARIANTS = {
    "fp32": ["precision=fp32"],
    "bf16": ["precision=bf16"],
    "fp16 + dynamic scaling": ["precision=fp16"],
    "fp16, no loss scaling": ["precision=fp16", "scaler.enabled=false"],
    "fp16 master weights": ["precision=fp16", "master_weights=fp16"],
}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"steps": {"cnn": 20, "transformer": 10}, "variants": list(VARIANTS), "reference_seeds": [1]}
    return {"steps": {"cnn": 800, "transformer": 300}, "variants": list(VARIANTS), "reference_seeds": [1, 2]}


def zero_gradient_fraction(trainer) -> float:
    """Share of gradient elements exactly zero after one backward on the first training batch."""
    batch = torch.arange(min(len(trainer.train_data), trainer.cfg.train.batch_size))
    inputs, targets = (t.to(trainer.engine.device) for t in fetch_batch(trainer.train_data, batch))
    trainer.engine.optimizer.zero_grad(set_to_none=True)
    trainer.engine.compute_gradients((inputs, targets))
    grads = [p.grad for p in trainer.engine.params if p.grad is not None]
    zeros = sum(int((g == 0).sum()) for g in grads)
    trainer.engine.optimizer.zero_grad(set_to_none=True)
    return zeros / max(1, sum(g.numel() for g in grads))


def one_run(model: str, variant: str, steps: int, seed: int = 0) -> dict[str, Any]:
    cfg = load_config(None, [*MODELS[model], *VARIANTS[variant], f"train.steps={steps}", "log.progress=off",
                             f"seed={seed}",
                             "log.plots=false", f"train.eval_every={steps}", "train.eval_batch_size=500",
                             "diagnostics.every=0"])
    trainer = Trainer.from_config(cfg)
    t0 = time.perf_counter()
    outcome, summary = "trained", {}
    try:
        summary = trainer.fit()
    except NonFiniteError as err:
        outcome = f"stopped: {str(err).split(';')[0]}"
        summary = {**trainer.summary(), **trainer.evaluate(), "steps": trainer.state.step}
    seconds = time.perf_counter() - t0
    quality_key = "test_accuracy" if model == "cnn" else "test_bpc"
    quality = summary.get(quality_key, math.nan)
    if outcome == "trained" and not math.isfinite(summary.get("test_loss", math.nan)):
        outcome = "diverged: non-finite test loss"
    return {
        "model": model, "variant": variant, "seed": seed, "outcome": outcome, "steps": summary["steps"],
        quality_key: quality, "test_loss": summary.get("test_loss"),
        "zero_grad_fraction": zero_gradient_fraction(trainer),
        "skipped_steps": summary.get("skipped_steps", 0), "final_loss_scale": summary.get("loss_scale"),
        "ms_per_step": 1e3 * seconds / max(1, summary["steps"]),
    }


def _plot(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=100)
    for ax, (model, key, label) in zip(axes, [("cnn", "test_accuracy", "test accuracy (higher is better)"),
                                               ("transformer", "test_bpc", "test bits/char (lower is better)")]):
        mine = [r for r in runs if r["model"] == model]
        values = [r[key] if r[key] == r[key] else 0.0 for r in mine]
        bars = ax.bar(range(len(mine)), values, color=[f"C{i}" for i in range(len(mine))])
        for bar, r in zip(bars, mine):
            ax.annotate(f"{r['zero_grad_fraction']:.0%} zero grads", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(mine)), [r["variant"] for r in mine], rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    write_with(out / "precision.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)


def run(out_dir: str, quick: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    s = settings(quick)
    runs, advice, references = [], {}, []
    for model in MODELS:
        report = inspect_precision(load_config(None, [*MODELS[model], "log.progress=off"]), steps=5)
        advice[model] = {"recommendation": report["recommendation"], "loss_scale": report["loss_scale"],
                         "at_risk": {k: v[:5] for k, v in report["at_risk"].items()},
                         "totals": report["totals"]}
        print(f"precision: {model}: inspect recommends {report['recommendation']['setting']} "
              f"(fp16 loss scale {report['loss_scale']:g}; at risk in fp16: "
              f"{', '.join(report['at_risk']['fp16'][:4]) or 'none'})", flush=True)
        for variant in s["variants"]:
            r = one_run(model, variant, s["steps"][model])
            runs.append(r)
            if variant == "fp32":  # more seeds of the reference: how much quality moves by chance alone
                references.extend(one_run(model, "fp32", s["steps"][model], seed) for seed in s["reference_seeds"])
            q = r.get("test_accuracy", r.get("test_bpc"))
            print(f"precision: {model:11s} {variant:24s} quality {q:.4f}, zero grads {r['zero_grad_fraction']:.2%}, "
                  f"skipped {r['skipped_steps']}, {r['ms_per_step']:.1f} ms/step, {r['outcome']}", flush=True)
    table = ["| model | variant | quality | zero-gradient fraction | skipped steps | final loss scale | ms/step "
             "| outcome |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        q = (f"accuracy {r['test_accuracy']:.3f}" if r["model"] == "cnn" else f"{r['test_bpc']:.3f} bits/char")
        scale = f"{r['final_loss_scale']:g}" if r["final_loss_scale"] else "-"
        table.append(f"| {r['model']} | {r['variant']} | {q} | {r['zero_grad_fraction']:.2%} | {r['skipped_steps']} "
                     f"| {scale} | {r['ms_per_step']:.1f} | {r['outcome']} |")
    verdicts = []
    for model, key, higher_is_better in (("cnn", "test_accuracy", True), ("transformer", "test_bpc", False)):
        by = {r["variant"]: r for r in runs if r["model"] == model}
        seeds = [by["fp32"][key], *(r[key] for r in references if r["model"] == model)]
        low, high = min(seeds), max(seeds)
        verdicts.append(f"- {model}: fp32 over {len(seeds)} seeds: {key} {low:.4f} .. {high:.4f} (chance alone).")
        for variant in ("bf16", "fp16 + dynamic scaling", "fp16, no loss scaling", "fp16 master weights"):
            if variant not in by:
                continue
            v = by[variant][key]
            if not math.isfinite(v):
                verdict = "diverged (non-finite loss)"
            elif low <= v <= high:
                verdict = "within fp32's seed-to-seed range: no measurable loss"
            elif (v < low) == higher_is_better:
                verdict = "worse than every fp32 seed"
            else:
                verdict = "better than every fp32 seed"
            verdicts.append(f"- {model}, {variant}: {key} {v:.4f}: {verdict}; zero gradients "
                            f"{by[variant]['zero_grad_fraction']:.2%} vs fp32 {by['fp32']['zero_grad_fraction']:.2%}.")
    results = {"settings": s, "models": MODELS, "variants": VARIANTS, "machine": describe_machine(), "runs": runs,
               "fp32_reference_seeds": references,
               "inspect": advice, "claims": verdicts}
    md = [
        "# repro precision",
        "",
        f"Machine: {results['machine']}" + (" (quick run)" if quick else ""),
        "",
        f"CNN on MNIST-1D (SGD+momentum, {s['steps']['cnn']} steps) and a 2-layer character transformer on the "
        f"Python stdlib sources (AdamW, {s['steps']['transformer']} steps), each in five precisions with everything "
        "else equal. Zero-gradient fraction: exact zeros among all gradient elements after one backward on a fixed "
        "batch at the end (fp32's share is structural).",
        "",
        *table,
        "",
        "## Against fp32",
        "",
        *verdicts,
        "",
        "## What `gradwise inspect precision` said before training",
        "",
        *[f"- {m}: {a['recommendation']['setting']}; fp16 loss scale {a['loss_scale']:g}; at risk in fp16: "
          f"{', '.join(a['at_risk']['fp16']) or 'none'}" for m, a in advice.items()],
        "",
        "![precision](precision.png)",
        "",
    ]
    write_json(out / "results.json", results)
    write_text(out / "results.md", "\n".join(md))
    _plot(runs, out)
    print("\n".join(md))
    return results
