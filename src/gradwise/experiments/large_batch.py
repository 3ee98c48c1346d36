"""`gradwise repro large-batch`: does layer-wise adaptation (LARS, LAMB) keep accuracy at large batch
where SGD+momentum and Adam lose it? (seed 002; You et al. 2017, 2019; Goyal et al. 2017)

The papers' regime at this machine's scale: the largest batch is 128x the smallest and still makes more than
500 updates, because every batch size trains the same number of epochs over a generated MNIST-1D training
set large enough for it (160,000 samples: 80% train of which 10% is held out for validation, 20% test).
Each optimizer trains with its paper's recipe at every batch size:

    SGD+momentum  Goyal et al. 2017: lr linear in the batch, 5/90 of training warmup, step decay x0.1 every
                  third of training, momentum 0.9, weight decay 1e-4
    Adam          AdamW as the LAMB paper's baseline: lr by the square root of the batch, 1/8 warmup, linear
                  decay, weight decay 0.01
    LARS          You et al. 2017: 5/90 warmup, polynomial decay (power 2), momentum 0.9, weight decay
                  1e-4; trust coefficient 1e-3 (the paper's) and 1e-2, the better on validation counting
                  (at a fixed rate for the weights, lr x eta, eta sets only the biases' plain-SGD lr)
    LAMB          You et al. 2019: lr by the square root of the batch, 1/8 warmup, linear decay, weight
                  decay 0.01, eps 1e-6

with biases (every 1-D tensor) out of weight decay and layer adaptation. The lr is chosen on validation at
every batch size (seed 0) from x1/3, x1, x3 of the scaled rate, extended by factors of 3 while the best sits
at an edge; the two largest batches then train 3 other seeds at the chosen lr, paired (a seed gives every
optimizer the same initial weights and data order). The test set only reports; the small-batch bar is the test
accuracy of the small-batch run that validated best.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from gradwise.bench import describe_machine
from gradwise.config import load_config
from gradwise.errors import NonFiniteError
from gradwise.experiments.reuse import runs_dir
from gradwise.experiments.selection import at_edge, extend_grid
from gradwise.experiments.stats import mean_ci, paired
from gradwise.io import write_json, write_text, write_with
from gradwise.train import Trainer

# name -> (config overrides, lr at batch 32, scale rule, warmup as a fraction of training, schedule)
RECIPES: dict[str, tuple[list[str], float, str, float, str]] = {
    "sgd+momentum": (["optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=1e-4"], 0.0125, "linear",
                     5 / 90, "step"),
    "adam": (["optim.name=adamw", "optim.weight_decay=0.01"], 1e-2, "sqrt", 1 / 8, "linear"),
    "lars eta=1e-3": (["optim.name=lars", "optim.momentum=0.9", "optim.weight_decay=1e-4",
                       "optim.trust_coefficient=1e-3"], 1.0, "sqrt", 5 / 90, "poly2"),
    "lars eta=1e-2": (["optim.name=lars", "optim.momentum=0.9", "optim.weight_decay=1e-4",
                       "optim.trust_coefficient=1e-2"], 0.1, "sqrt", 5 / 90, "poly2"),
    "lamb": (["optim.name=lamb", "optim.weight_decay=0.01", "optim.eps=1e-6"], 6e-3, "sqrt", 1 / 8, "linear"),
}
SCHEDULES = {"step": ["schedule.name=step", "schedule.gamma=0.1"], "linear": ["schedule.name=poly", "schedule.power=1"],
             "poly2": ["schedule.name=poly", "schedule.power=2"]}
CHANCE = 0.15  # validation accuracy below this (MNIST-1D: 10 classes) counts as not trained
CHANNELS = [32, 32, 32]
COMMON = ["data.name=mnist1d", "data.val_fraction=0.1", "model.name=cnn", f"model.channels={CHANNELS}",
          "model.kernel_sizes=[5,3,3]", "train.steps=null", "train.eval_every=null", "train.eval_batch_size=4096",
          "schedule.base_batch=32", "log.progress=off", "log.plots=false", "diagnostics.every=0"]


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"num_samples": 2560, "epochs": 2, "batches": [32, 128, 512], "grid": [1.0], "extensions": 0,
                "select_seed": 0, "seeds": [1, 2]}
    return {"num_samples": 160_000, "epochs": 9, "batches": [16, 128, 512, 2048], "grid": [1 / 3, 1.0, 3.0],
            "extensions": 2, "select_seed": 0, "seeds": [1, 2, 3]}


def settings_record(s: dict[str, Any]) -> dict[str, Any]:
    """What results.json records as the settings: `s` with the recipes it ran."""
    return {**s, "recipes": {k: {"overrides": v[0], "lr_at_32": v[1], "scale_rule": v[2], "warmup_fraction": v[3],
                                 "schedule": SCHEDULES[v[4]]} for k, v in RECIPES.items()}, "common": COMMON}


def train_one(overrides: list[str]) -> dict[str, Any]:
    """One run; a diverged run (a non-finite step, or a non-finite evaluation) scores accuracy 0."""
    cfg = load_config(None, [*COMMON, *overrides])
    trainer = Trainer.from_config(cfg)
    t0 = time.perf_counter()
    try:
        summary = trainer.fit()
    except NonFiniteError:
        summary = {"steps": trainer.state.step, "test_loss": math.nan, "val_loss": math.nan,
                   "final_train_loss": math.nan}
    state = trainer.engine.optimizer.state
    ratios = {name: float(state[p]["trust_ratio"])
              for name, p in trainer.model.named_parameters() if "trust_ratio" in state.get(p, {})}
    finite = math.isfinite(summary["test_loss"]) and math.isfinite(summary["val_loss"])
    return {"lr": trainer.engine.lr, "steps": summary["steps"], "seed": cfg.seed, "diverged": not finite,
            "val_accuracy": summary["val_accuracy"] if finite else 0.0,
            "test_accuracy": summary["test_accuracy"] if finite else 0.0, "test_loss": summary["test_loss"],
            "final_train_loss": summary["final_train_loss"], "seconds": round(time.perf_counter() - t0, 2),
            "trust_ratios": ratios}


def one_run(optimizer: str, batch: int, multiplier: float, seed: int, s: dict[str, Any], out: Path) -> dict[str, Any]:
    """`optimizer`'s recipe at `batch` and `multiplier` x its scaled lr; read back if already finished."""
    path = runs_dir(out, settings_record(s)) / f"{optimizer}-b{batch}-x{multiplier:.6g}-s{seed}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "reused": True}
    overrides, lr32, rule, warmup, schedule = RECIPES[optimizer]
    steps_per_epoch = math.ceil(round(s["num_samples"] * 0.8 * 0.9) / batch)
    extra = [f"schedule.step_every={max(1, steps_per_epoch * s['epochs'] // 3)}"] if schedule == "step" else []
    r = train_one([f"data.num_samples={s['num_samples']}", f"train.batch_size={batch}", f"train.epochs={s['epochs']}",
                   f"seed={seed}", f"optim.lr={lr32 * multiplier:.6g}", f"schedule.scale_rule={rule}",
                   f"schedule.warmup_epochs={warmup * s['epochs']:.6g}", *SCHEDULES[schedule], *extra, *overrides])
    r = {"optimizer": optimizer, "batch_size": batch, "lr_multiplier": multiplier, **r}
    write_json(path, r)
    print(f"large-batch: batch {batch:5d} {optimizer:13s} lr {r['lr']:<8.4g} seed {seed}: val accuracy "
          f"{r['val_accuracy']:.3f} test {r['test_accuracy']:.3f} ({r['steps']} steps, {r['seconds']:.0f}s)",
          flush=True)
    return r


def score(run: dict[str, Any]) -> tuple[float, float]:
    """Validation accuracy; a run at chance level (or diverged) ranks below every other, and among those the
    smaller lr first, so a grid that is too hot everywhere extends downwards rather than following noise."""
    return (run["val_accuracy"], 0.0) if run["val_accuracy"] >= CHANCE else (-1.0, -run["lr"])


def select(s: dict[str, Any], out: Path) -> tuple[list[dict], dict]:
    """Every optimizer's lr at every batch, chosen on validation at the selection seed."""
    runs, chosen = [], {}
    for batch in s["batches"]:
        for optimizer in RECIPES:
            done = extend_grid(lambda m, o=optimizer, b=batch: one_run(o, b, m, s["select_seed"], s, out), s["grid"],
                               s["extensions"], 3.0, score)
            runs.extend(done.values())
            pick = max(done, key=lambda m: score(done[m]))
            chosen[(optimizer, batch)] = {**done[pick], "grid_edge": len(done) > 1 and at_edge(pick, done)}
    return runs, chosen


def verdicts(small: float, chosen: dict, seeded: dict, batches: list[int]) -> tuple[list[str], dict[str, str]]:
    """Per large batch and layer-wise optimizer: does it keep the small-batch accuracy (within 1 point, the
    interval's lower end above the bar), and does it beat its base optimizer (LARS: SGD+momentum, LAMB: Adam)?
    LARS is the trust coefficient whose chosen run validated better."""
    lines, out = [], {}
    bar = small - 0.01
    for batch in batches:
        lars = max((n for n in RECIPES if n.startswith("lars")), key=lambda n: chosen[(n, batch)]["val_accuracy"])
        for family, layerwise, base in (("lars", lars, "sgd+momentum"), ("lamb", "lamb", "adam")):
            mine = seeded[(layerwise, batch)]
            mean, half = mean_ci([r["test_accuracy"] for r in mine])
            gain, gain_ci = paired(mine, seeded[(base, batch)], "test_accuracy")
            if mean - half >= bar:
                verdict = "held"
            elif mean + half >= bar:
                verdict = "not shown (the interval spans the bar)"
            elif gain - gain_ci > 0:
                verdict = f"held partly (better than {base}, short of the small-batch accuracy)"
            else:
                verdict = "not held"
            out[f"{family}@{batch}"] = verdict
            base_mean, base_half = mean_ci([r["test_accuracy"] for r in seeded[(base, batch)]])
            kept = "keeps it too" if base_mean - base_half >= bar else "loses it" if base_mean + base_half < bar \
                else "spans the bar"
            lines.append(f"- batch {batch}, {layerwise}: {mean:.3f} ± {half:.3f} against the bar {bar:.3f} "
                         f"(small-batch accuracy {small:.3f} - 1 point); {base} {base_mean:.3f} ± {base_half:.3f} "
                         f"({kept}); {layerwise} - {base} {gain * 100:+.1f} ± {gain_ci * 100:.1f} points "
                         f"(paired): **{verdict}**")
    return lines, out


def _plot(chosen: dict, seeded: dict, batches: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, optimizer in enumerate(RECIPES):
        stats = [mean_ci([r["test_accuracy"] for r in seeded[(optimizer, b)]]) if (optimizer, b) in seeded
                 else (chosen[(optimizer, b)]["test_accuracy"], 0.0) for b in batches]
        ax.errorbar(batches, [m for m, _ in stats], yerr=[h for _, h in stats], fmt="o-", capsize=3, color=f"C{i}",
                    label=optimizer)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (equal epochs)")
    ax.set_ylabel("test accuracy (lr chosen on validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(out / "accuracy_vs_batch.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)


def run(out_dir: str, quick: bool = False) -> dict[str, Any]:
    out, s, t0 = Path(out_dir), settings(quick), time.perf_counter()
    runs, chosen = select(s, out)
    large = s["batches"][-2:]
    seeded = {(o, b): [one_run(o, b, chosen[(o, b)]["lr_multiplier"], seed, s, out) for seed in s["seeds"]]
              for b in large for o in RECIPES}
    everything = runs + [r for rs in seeded.values() for r in rs]
    minutes = (time.perf_counter() - t0) / 60
    trained = sum(r["seconds"] for r in everything) / 60
    small = max((chosen[(o, s["batches"][0])] for o in RECIPES), key=score)["test_accuracy"]  # chosen on validation
    verdict_lines, verdict = verdicts(small, chosen, seeded, large)
    updates = {b: chosen[("sgd+momentum", b)]["steps"] for b in s["batches"]}
    table = ["| batch | updates | " + " | ".join(RECIPES) + " |", "|---|---|" + "---|" * len(RECIPES)]
    for b in s["batches"]:
        cells = []
        for o in RECIPES:
            c = chosen[(o, b)]
            value = (f"{c['test_accuracy']:.3f}" if (o, b) not in seeded else
                     "{:.3f} ± {:.3f}".format(*mean_ci([r["test_accuracy"] for r in seeded[(o, b)]])))
            cells.append(f"{value} (lr {c['lr']:.3g}{', grid edge' if c['grid_edge'] else ''})")
        table.append(f"| {b} | {updates[b]} | " + " | ".join(cells) + " |")
    results = {"settings": settings_record(s), "machine": describe_machine(), "runs": everything,
               "chosen": [{k: v for k, v in c.items() if k != "reused"} for c in chosen.values()],
               "seeded": [{"optimizer": o, "batch_size": b, "test_accuracy": [r["test_accuracy"] for r in rs]}
                          for (o, b), rs in seeded.items()], "updates": updates, "small_batch_best": small,
               "verdicts": verdict, "wall_minutes": minutes, "training_minutes": trained}
    decay = {"step": "step decay (x0.1 every third of training)", "linear": "linear decay",
             "poly2": "polynomial decay (power 2)"}
    recipes = [f"- {o}: lr {v[1]:g} at batch 32, scaled {'linearly' if v[2] == 'linear' else 'by the square root'} "
               f"with the batch; warmup {v[3] * s['epochs']:.2g} epochs; {decay[v[4]]}; {' '.join(v[0])}"
               for o, v in RECIPES.items()]
    md = [
        "# repro large-batch", "",
        f"Machine: {results['machine']}" + (" (quick run)" if quick else ""),
        f"Training time summed over the {len(everything)} runs: {trained:.1f} min; this invocation's wall time "
        f"{minutes:.1f} min ({sum(bool(r.get('reused')) for r in everything)} runs reused from an earlier "
        "invocation into the same folder).", "",
        "Claim (seed 002; You et al. 2017, 2019): layer-wise adaptive rates (LARS for SGD, LAMB for Adam) keep "
        "the small-batch accuracy at batch sizes where SGD+momentum and Adam lose it (the papers: ImageNet "
        "convnets at batch 8K-32K with LARS, BERT at 32K-64K with LAMB, with thousands of updates at the "
        "largest batch).", "",
        f"**Here**: MNIST-1D, {s['num_samples']:,} generated samples (80% train of which 10% validation, 20% test); "
        f"a CNN (channels {CHANNELS}); {s['epochs']} epochs at every batch size, so batch {s['batches'][-1]} "
        f"({s['batches'][-1] // s['batches'][0]}x the smallest) makes {updates[s['batches'][-1]]} updates. "
        "Each optimizer with its paper's recipe (no weight decay or adaptation on biases):", "", *recipes, "",
        f"lr chosen on validation (seed {s['select_seed']}) from x{', x'.join(f'{m:.3g}' for m in s['grid'])} of the "
        f"scaled rate, extended by 3x while the best sat at an edge (at most {s['extensions']} times; \"grid "
        f"edge\": still at the edge; a run under {CHANCE} validation accuracy ranks last). Test accuracy; at the "
        f"two largest batches mean ± 95% t interval over seeds {s['seeds']} at the chosen lr:", "",
        *table, "",
        "## Verdict", "",
        "**held**: the interval's lower end within 1 point of the small-batch accuracy (the test accuracy of the "
        f"batch-{s['batches'][0]} run that validated best); **held partly**: "
        "short of that, but better than its base optimizer at the same batch (paired interval above 0); "
        "**not shown**: the interval spans the bar.", "", *verdict_lines, "",
        f"What differs from the papers: a {len(CHANNELS) + 1}-layer CNN on a 1-D synthetic task instead of "
        f"ResNet/AlexNet on ImageNet or BERT; {updates[s['batches'][-1]]} updates at the largest batch instead of "
        "thousands; one seed (the selection seed) below the two largest batches.", "",
        "![accuracy vs batch](accuracy_vs_batch.png)", "",
    ]
    write_json(out / "results.json", results)
    write_text(out / "results.md", "\n".join(md))
    _plot(chosen, seeded, s["batches"], out)
    print("\n".join(md))
    return results
