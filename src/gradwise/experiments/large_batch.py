"""`gradwise repro large-batch`: does layer-wise adaptation (LARS, LAMB) keep accuracy at large batch
where SGD+momentum and Adam lose it? (seed 002; You et al. 2017, 2019; Goyal et al. 2017)

MNIST-1D with 32,768 training samples (so batch 8192 still takes 80 updates),
batch sizes 32 ... 8192 at an equal epoch budget, a small CNN. Each optimizer
scales its learning rate with the batch (SGD linearly, the others by the square
root) from a base rate at batch 32, warms up linearly for 2 epochs and decays
by cosine; a sweep over x1/3, x1, x3 of the scaled rate picks the best per batch
size, extended by further factors of 3 (up to two) while the best sits at an
edge, so no optimizer is judged at a rate cut off by the grid. Reported: best test accuracy per (batch size, optimizer), every run, and
the per-layer trust ratios LARS and LAMB ended with.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from gradwise.config import load_config
from gradwise.io import write_json, write_text
from gradwise.train import Trainer

# name -> (config overrides, base lr at batch 32, scale rule). Base rates were centred by a 5-epoch
# calibration at batch 512 (the sweep below then spans x1/3 .. x3 around them).
OPTIMIZERS: dict[str, tuple[list[str], float, str]] = {
    "sgd+momentum": (["optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=1e-4"], 0.015, "linear"),
    "adam": (["optim.name=adam"], 1e-2, "sqrt"),
    "lars": (["optim.name=lars", "optim.momentum=0.9", "optim.weight_decay=1e-4"], 2.0, "sqrt"),
    "lamb": (["optim.name=lamb", "optim.weight_decay=0.01", "optim.eps=1e-6"], 6e-3, "sqrt"),
}
SWEEP = (1 / 3, 1.0, 3.0)
MAX_EXTENSIONS = 2


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"num_samples": 2560, "epochs": 2, "batches": [32, 256, 2048], "sweep": (1.0,), "extensions": 0}
    return {"num_samples": 40960, "epochs": 20, "batches": [32, 128, 512, 2048, 8192], "sweep": SWEEP,
            "extensions": MAX_EXTENSIONS}


def one_run(optimizer: str, batch: int, multiplier: float, s: dict[str, Any]) -> dict[str, Any]:
    overrides, base_lr, rule = OPTIMIZERS[optimizer]
    cfg = load_config(None, [
        "data.name=mnist1d", f"data.num_samples={s['num_samples']}",
        "model.name=cnn", "model.channels=[32,32,32]", "model.kernel_sizes=[5,3,3]",
        f"train.batch_size={batch}", f"train.epochs={s['epochs']}", "train.steps=null",
        "train.eval_every=1000000", "train.eval_batch_size=4096", "log.progress=off",
        "schedule.name=cosine", "schedule.warmup_epochs=2", f"schedule.scale_rule={rule}", "schedule.base_batch=32",
        f"optim.lr={base_lr * multiplier}", *overrides,
    ])
    trainer = Trainer.from_config(cfg)
    t0 = time.perf_counter()
    summary = trainer.fit()
    ratios = {name: float(trainer.engine.optimizer.state[p]["trust_ratio"])
              for name, p in trainer.model.named_parameters() if "trust_ratio" in trainer.engine.optimizer.state.get(p, {})}
    accuracy = summary["test_accuracy"]
    return {
        "optimizer": optimizer, "batch_size": batch, "lr_multiplier": multiplier, "lr": trainer.engine.lr,
        "steps": summary["steps"], "test_accuracy": accuracy if math.isfinite(summary["test_loss"]) else 0.0,
        "test_loss": summary["test_loss"], "final_train_loss": summary["final_train_loss"],
        "seconds": round(time.perf_counter() - t0, 2), "trust_ratios": ratios,
    }


def sweep(optimizer: str, batch: int, s: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs over the lr grid, extended past an edge (up to s["extensions"] times) while the best sits there."""
    done: dict[float, dict[str, Any]] = {}

    def run_at(multiplier: float) -> None:
        r = one_run(optimizer, batch, multiplier, s)
        done[multiplier] = r
        print(f"large-batch: batch {batch:5d} {optimizer:13s} lr {r['lr']:.4g}: "
              f"test accuracy {r['test_accuracy']:.3f} ({r['steps']} steps, {r['seconds']:.0f}s)", flush=True)

    for multiplier in s["sweep"]:
        run_at(multiplier)
    for _ in range(s["extensions"]):
        best = max(done, key=lambda m: done[m]["test_accuracy"])
        if best == min(done):
            run_at(best / 3)
        elif best == max(done):
            run_at(best * 3)
        else:
            break
    return [done[m] for m in sorted(done)]


def _plot(best: dict, batches: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradwise.io import write_with

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for optimizer in OPTIMIZERS:
        ax.plot(batches, [best[(optimizer, b)]["test_accuracy"] for b in batches], "o-", label=optimizer)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (equal epochs)")
    ax.set_ylabel("best test accuracy over the lr sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_with(out / "accuracy_vs_batch.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)


def run(out_dir: str, quick: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    s = settings(quick)
    runs = []
    for batch in s["batches"]:
        for optimizer in OPTIMIZERS:
            runs.extend(sweep(optimizer, batch, s))
    best = {}
    for r in runs:
        key = (r["optimizer"], r["batch_size"])
        if key not in best or r["test_accuracy"] > best[key]["test_accuracy"]:
            best[key] = r
    from gradwise.bench import describe_machine

    results = {"settings": {**s, "sweep": list(s["sweep"]), "optimizers": {k: {"overrides": v[0], "base_lr": v[1],
               "scale_rule": v[2]} for k, v in OPTIMIZERS.items()}}, "machine": describe_machine(), "runs": runs,
               "best": [best[(o, b)] for b in s["batches"] for o in OPTIMIZERS]}
    header = "| batch | " + " | ".join(OPTIMIZERS) + " |"
    lines = [header, "|" + "---|" * (len(OPTIMIZERS) + 1)]
    for b in s["batches"]:
        cells = [f"{best[(o, b)]['test_accuracy']:.3f} (lr {best[(o, b)]['lr']:.3g})" for o in OPTIMIZERS]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    drops = {o: best[(o, s["batches"][0])]["test_accuracy"] - best[(o, s["batches"][-1])]["test_accuracy"]
             for o in OPTIMIZERS}
    trust_lines = []
    for o in ("lars", "lamb"):
        for b in (s["batches"][0], s["batches"][-1]):
            ratios = best[(o, b)]["trust_ratios"]
            shown = ", ".join(f"{k} {v:.3g}" for k, v in ratios.items())
            trust_lines.append(f"- {o}, batch {b}: {shown}")
    md = [
        "# repro large-batch",
        "",
        f"Machine: {results['machine']}" + (" (quick run)" if quick else ""),
        "",
        f"MNIST-1D, {int(s['num_samples'] * 0.8)} training samples, CNN channels [32,32,32], {s['epochs']} epochs "
        f"at every batch size, 2 warmup epochs then cosine. Best test accuracy over the lr sweep "
        f"(x{', x'.join(f'{m:.3g}' for m in s['sweep'])} of the scaled rate, extended by factors of 3 while the best "
        f"was at an edge, at most {s['extensions']} times); the lr shown is the winner.",
        "",
        *lines,
        "",
        "Accuracy lost from the smallest to the largest batch: "
        + ", ".join(f"{o} {d:+.3f}" for o, d in drops.items()).replace("+-", "-"),
        "",
        "Per-layer trust ratios at the end of the best run (LARS: its local lr factor eta*||w||/(||g||+wd||w||); "
        "LAMB: ||w||/||u||):",
        "",
        *trust_lines,
        "",
        "![accuracy vs batch](accuracy_vs_batch.png)",
        "",
    ]
    results["accuracy_drop_smallest_to_largest"] = drops
    write_json(out / "results.json", results)
    write_text(out / "results.md", "\n".join(md))
    _plot(best, s["batches"], out)
    print("\n".join(md))
    return results
