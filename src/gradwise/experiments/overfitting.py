"""`gradwise repro overfitting`: the Keras figures on model size and regularisation, re-made
(seed 000, Keras section; seed 003 on Dropout/DropConnect/BatchNorm).

500 MNIST-1D training samples (with 500 validation samples carved from the same
training split, and 1,500 test samples), an MLP trained by Adam long enough to
overfit. Variants: the baseline, a smaller and a bigger network, L1 and L2
penalties, decoupled weight decay (AdamW), dropout, DropConnect (mean rule and
Gaussian moment matching at inference), BatchNorm, and the baseline with early
stopping. Each runs for several seeds; curves are per-epoch means over seeds.

Reported per variant: the best validation loss and the epoch it occurred, the
final validation loss, the final training loss (evaluated in eval mode on the
training set, so dropout noise does not inflate it), the gap between them, and
test accuracy. The seed's claims are checked from these numbers:
smaller networks start overfitting later, and L2 and dropout shrink the gap.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from gradwise.bench import describe_machine
from gradwise.config import load_config
from gradwise.data import build_data
from gradwise.data.sampler import batches_per_epoch
from gradwise.io import write_json, write_text, write_with
from gradwise.train import Trainer

BASE = ["model.name=mlp", "model.depth=2", "model.width=128", "optim.name=adam", "optim.lr=0.001",
        "schedule.name=constant", "train.batch_size=32"]
# name -> overrides on top of BASE
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "smaller": ["model.width=16"],
    "bigger": ["model.depth=3", "model.width=512"],
    "l1": ["regularize.l1=0.0001"],
    "l2": ["regularize.l2=0.001"],
    "weight decay": ["optim.name=adamw", "optim.weight_decay=1.0"],
    "dropout": ["model.dropout=0.5"],
    "dropconnect": ["model.dropconnect=0.5"],
    "dropconnect (gaussian)": ["model.dropconnect=0.5", "model.dropconnect_inference=gaussian"],
    "batchnorm": ["model.norm=batch"],
    "early stopping": ["early_stopping.patience=10"],
}
FIGURES = {  # file -> (title, variants)
    "size.png": ("Model size (Keras: smaller overfits later, bigger sooner)", ["smaller", "baseline", "bigger"]),
    "penalties.png": ("Weight penalties", ["baseline", "l1", "l2", "weight decay"]),
    "dropout.png": ("Dropout, DropConnect, BatchNorm", ["baseline", "dropout", "dropconnect", "batchnorm"]),
}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"epochs": 3, "seeds": [0], "variants": ["baseline", "smaller", "l2", "dropout", "early stopping"]}
    return {"epochs": 80, "seeds": [0, 1, 2, 3, 4], "variants": list(VARIANTS)}


def one_run(variant: str, seed: int, epochs: int) -> dict[str, Any]:
    cfg = load_config(None, [
        "data.name=mnist1d", "data.num_samples=2500", "data.train_split=0.4", "data.val_fraction=0.5",
        *BASE, f"seed={seed}", f"train.epochs={epochs}", "train.steps=null", "log.progress=off",
        "train.eval_batch_size=2000", "diagnostics.every=0", *VARIANTS[variant],
    ])
    spe = batches_per_epoch(len(build_data(cfg.data).train), cfg.train.batch_size, cfg.train.drop_last)
    cfg.train.eval_every = cfg.log.every = spe  # one record per epoch
    trainer = Trainer.from_config(cfg)
    t0 = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    train_eval = trainer.evaluate(trainer.train_data, prefix="train")
    curves = {"epoch": [], "train_loss": [], "val_loss": []}
    train_by_step = {r["step"]: r["train_loss"] for r in trainer.records if r["kind"] == "train"}
    for r in trainer.records:
        if r["kind"] == "eval" and "restored_from_step" not in r and r["step"] % spe == 0:
            curves["epoch"].append(r["step"] // spe)
            curves["val_loss"].append(r["val_loss"])
            curves["train_loss"].append(train_by_step.get(r["step"]))
    best = min(range(len(curves["val_loss"])), key=curves["val_loss"].__getitem__)
    return {
        "variant": variant, "seed": seed, "epochs_run": summary["steps"] / spe,
        "best_val_loss": curves["val_loss"][best], "best_epoch": curves["epoch"][best],
        "final_val_loss": summary["val_loss"], "final_train_loss": train_eval["train_loss"],
        "gap": summary["val_loss"] - train_eval["train_loss"], "test_accuracy": summary["test_accuracy"],
        "train_accuracy": train_eval["train_accuracy"], "parameters": summary["num_parameters"],
        "seconds": round(seconds, 2), "curves": curves,
    }


def aggregate(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        row = {"variant": v, "seeds": len(mine), "parameters": mine[0]["parameters"]}
        for key in ("best_val_loss", "best_epoch", "final_val_loss", "final_train_loss", "gap", "test_accuracy",
                    "train_accuracy", "epochs_run", "seconds"):
            row[key] = statistics.fmean([r[key] for r in mine])
        row["gap_sd"] = statistics.stdev([r["gap"] for r in mine]) if len(mine) > 1 else 0.0
        rows.append(row)
    return rows


def mean_curve(runs: list[dict[str, Any]], variant: str, key: str) -> tuple[list[int], list[float]]:
    mine = [r["curves"] for r in runs if r["variant"] == variant]
    n = min(len(c["epoch"]) for c in mine)
    return mine[0]["epoch"][:n], [statistics.fmean([c[key][i] for c in mine]) for i in range(n)]


def _plots(runs: list[dict[str, Any]], variants: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for filename, (title, names) in FIGURES.items():
        names = [n for n in names if n in variants]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        for i, name in enumerate(names):
            colour = f"C{i}"
            epochs, val = mean_curve(runs, name, "val_loss")
            _, train = mean_curve(runs, name, "train_loss")
            ax.plot(epochs, val, "-", color=colour, label=f"{name} validation")
            ax.plot(epochs, train, ":", color=colour, label=f"{name} training")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (mean over seeds)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        write_with(out / filename, lambda h: fig.savefig(h, format="png"))
        plt.close(fig)
        written.append(filename)
    return written


def claims(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The seed's claims, each judged from the measured table (only those whose variants ran)."""
    lines = []

    def verdict(ok: bool) -> str:
        return "held" if ok else "did not hold"

    if {"smaller", "baseline", "bigger"} <= rows.keys():
        s, b, g = (rows[k]["best_epoch"] for k in ("smaller", "baseline", "bigger"))
        lines.append(f"- Smaller networks start overfitting later: best validation epoch smaller {s:.1f}, "
                     f"baseline {b:.1f}, bigger {g:.1f} -> {verdict(s > b > g)}.")
    elif {"smaller", "baseline"} <= rows.keys():
        s, b = rows["smaller"]["best_epoch"], rows["baseline"]["best_epoch"]
        lines.append(f"- Smaller networks start overfitting later: smaller {s:.1f}, baseline {b:.1f} -> "
                     f"{verdict(s > b)}.")
    for name in ("l2", "dropout", "l1", "weight decay", "dropconnect", "batchnorm"):
        if name in rows and "baseline" in rows:
            g, b = rows[name]["gap"], rows["baseline"]["gap"]
            claim = "seed claim" if name in ("l2", "dropout") else "also measured"
            lines.append(f"- {name} shrinks the train-validation gap ({claim}): {g:.3f} vs baseline {b:.3f} -> "
                         f"{verdict(g < b)}.")
    return lines


def run(out_dir: str, quick: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    s = settings(quick)
    runs = []
    for variant in s["variants"]:
        for seed in s["seeds"]:
            r = one_run(variant, seed, s["epochs"])
            runs.append(r)
            print(f"overfitting: {variant:22s} seed {seed}: best val loss {r['best_val_loss']:.3f} at epoch "
                  f"{r['best_epoch']}, gap {r['gap']:.3f}, test accuracy {r['test_accuracy']:.3f} "
                  f"({r['seconds']:.0f}s)", flush=True)
    rows = aggregate(runs, s["variants"])
    by_name = {r["variant"]: r for r in rows}

    table = ["| variant | parameters | best val loss | best epoch | final val loss | final train loss "
             "| gap (val - train) | test accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['variant']} | {r['parameters']:,} | {r['best_val_loss']:.3f} | {r['best_epoch']:.1f} | "
                     f"{r['final_val_loss']:.3f} | {r['final_train_loss']:.3f} | {r['gap']:.3f} ± {r['gap_sd']:.3f} "
                     f"| {r['test_accuracy']:.3f} |")
    results = {"settings": {**s, "base": BASE, "variants": {v: VARIANTS[v] for v in s["variants"]}},
               "machine": describe_machine(), "table": rows, "runs": runs}
    figures = _plots(runs, s["variants"], out)
    verdicts = claims(by_name)
    md = [
        "# repro overfitting",
        "",
        f"Machine: {results['machine']}" + (" (quick run)" if quick else ""),
        "",
        f"MNIST-1D: 500 training samples, 500 validation samples carved from the training split "
        f"(`data.val_fraction=0.5`), 1,500 test samples. Baseline: MLP with two hidden layers of 128 (ReLU), "
        f"Adam lr 1e-3, batch 32, {s['epochs']} epochs; every figure is the mean over seeds {s['seeds']}. "
        "Training loss is evaluated on the training set in eval mode at the end; the gap is final validation loss "
        "minus it (± the standard deviation over seeds). Variants change one thing: "
        + "; ".join(f"{v}: `{' '.join(VARIANTS[v]) or '-'}`" for v in s["variants"]) + ".",
        "",
        *table,
        "",
        "## The seed's claims, checked",
        "",
        *verdicts,
        "",
        *[f"![{f}]({f})" for f in figures],
        "",
    ]
    results["claims"] = verdicts
    write_json(out / "results.json", results)
    write_text(out / "results.md", "\n".join(md))
    print("\n".join(md))
    return results
