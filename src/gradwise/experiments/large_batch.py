"""`gradwise repro large-batch`: does layer-wise adaptation (LARS, LAMB) keep accuracy at large batch
where SGD+momentum and Adam lose it? (seed 002; You et al. 2017, 2019; Goyal et al. 2017)

MNIST-1D with 40,960 samples (80% train of which 10% is held out for validation, 20% test), a small
CNN, 20 epochs at every batch size. Every learning rate is chosen on the validation split; the test
set only reports.

Part one, one recipe for all: batch sizes 32 ... 8192; each optimizer scales its learning rate with
the batch (SGD linearly, the others by the square root) from a base rate at batch 32, warms up
linearly for 2 epochs and decays by cosine; a sweep over x1/3, x1, x3 of the scaled rate, extended
by factors of 3 (up to two) while the best sits at an edge.

Part two, the layer-wise optimizers' own recipe at batch 2048 and 8192: 5 warmup epochs, then
polynomial decay (power 2 for LARS as in You et al. 2017, power 1 for LAMB as in BERT's schedule the
LAMB paper trains with), a grid of 8 powers of 2 (128x, 2.1 decades, extended at an edge), LARS
at trust coefficient 1e-3 and 1e-2, each also run with pytorch-optimizer's LARS (an independent
implementation) so implementation and recipe separate; the chosen setting then trained with 3 seeds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from gradwise.bench import describe_machine
from gradwise.config import load_config
from gradwise.data import build_data
from gradwise.errors import ConfigError, NonFiniteError
from gradwise.experiments.reuse import previous_results
from gradwise.experiments.stats import mean_ci
from gradwise.io import write_json, write_text, write_with
from gradwise.nn import build_model
from gradwise.optim.groups import param_groups
from gradwise.train import Trainer
from gradwise.train.randomness import seed_everything

# name -> (config overrides, base lr at batch 32, scale rule). Base rates were centred by a 5-epoch
# calibration at batch 512 (the sweep below then spans x1/3 .. x3 around them).
OPTIMIZERS: dict[str, tuple[list[str], float, str]] = {
    "sgd+momentum": (["optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=1e-4"], 0.015, "linear"),
    "adam": (["optim.name=adam"], 1e-2, "sqrt"),
    "lars": (["optim.name=lars", "optim.momentum=0.9", "optim.weight_decay=1e-4"], 2.0, "sqrt"),
    "lamb": (["optim.name=lamb", "optim.weight_decay=0.01", "optim.eps=1e-6"], 6e-3, "sqrt"),
}
SWEEP = (1 / 3, 1.0, 3.0)
CHANCE = 0.15  # validation accuracy below this (MNIST-1D: 10 classes) counts as not trained
MAX_EXTENSIONS = 2
COMMON = ["data.name=mnist1d", "data.val_fraction=0.1", "model.name=cnn", "model.channels=[32,32,32]",
          "model.kernel_sizes=[5,3,3]", "train.steps=null", "train.eval_every=null", "train.eval_batch_size=4096",
          "log.progress=off"]

# Part two. name -> (optimizer, implementation, trust coefficient, poly power). The grid is over the rate
# the weights see: lr * eta for LARS (its update is lr * eta * ||w||/||g|| * g, so eta alone only sets
# the biases' plain-SGD rate lr = rate / eta), lr for LAMB.
RECIPES: dict[str, tuple[str, str, float | None, float]] = {
    "lars eta=1e-3": ("lars", "gradwise", 1e-3, 2.0),
    "lars eta=1e-2": ("lars", "gradwise", 1e-2, 2.0),
    "lars eta=1e-3 (pytorch-optimizer)": ("lars", "pytorch-optimizer", 1e-3, 2.0),
    "lars eta=1e-2 (pytorch-optimizer)": ("lars", "pytorch-optimizer", 1e-2, 2.0),
    "lamb": ("lamb", "gradwise", None, 1.0),
}
RECIPE_CENTRE = {"lars": 4e-3, "lamb": 0.032}  # part one's best at 2048/8192: lars 5.3e-3/3.6e-3, lamb 0.048/0.096
RECIPE_GRID = tuple(2.0 ** k for k in range(-3, 5))
RECIPE_SEEDS = (0, 1, 2)


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"num_samples": 2560, "epochs": 2, "batches": [32, 256, 2048], "sweep": (1.0,), "extensions": 0,
                "recipe_batches": [256], "recipe_grid": (0.5, 2.0), "recipe_seeds": (0, 1), "warmup_epochs": 0.5}
    return {"num_samples": 40960, "epochs": 20, "batches": [32, 128, 512, 2048, 8192], "sweep": SWEEP,
            "extensions": MAX_EXTENSIONS, "recipe_batches": [2048, 8192], "recipe_grid": RECIPE_GRID,
            "recipe_seeds": RECIPE_SEEDS, "warmup_epochs": 5.0}


def settings_record(s: dict[str, Any]) -> dict[str, Any]:
    """What results.json records as the settings: `s` with the optimizer and recipe tables it ran."""
    return {**s, "sweep": list(s["sweep"]), "recipe_grid": list(s["recipe_grid"]),
            "optimizers": {k: {"overrides": v[0], "base_lr": v[1], "scale_rule": v[2]} for k, v in OPTIMIZERS.items()},
            "recipes": {k: {"optimizer": v[0], "implementation": v[1], "trust_coefficient": v[2], "poly_power": v[3]}
                        for k, v in RECIPES.items()},
            "recipe_centre": RECIPE_CENTRE}


def finished_runs(previous: Path, s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Runs an earlier invocation into the same folder finished with the same settings, by run key: the whole
    settings record (budget, grids, each optimizer's overrides and base lr) must match, as a run is keyed by its
    lr multiplier."""
    old = previous_results(previous, settings_record(s))
    if old is None:
        return {}
    cache = {f"one|{r['optimizer']}|{r['batch_size']}|{r['lr_multiplier']:.6g}": r for r in old["runs"]}
    cache.update({f"two|{r['recipe']}|{r['batch_size']}|{r['lr_multiplier']:.6g}|{r['seed']}": r
                  for r in old.get("recipe_runs", [])})
    return cache


def _pytorch_optimizer_lars(model, cfg):
    try:
        from pytorch_optimizer import LARS
    except ImportError:
        raise ConfigError("config error: repro large-batch runs pytorch-optimizer's LARS alongside gradwise's; "
                          "install it with: pip install -e '.[bench]'") from None


    return LARS(param_groups(model, cfg.optim.weight_decay, cfg.optim.exclude), lr=cfg.optim.lr,
                momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.trust_coefficient)


def _trainer(cfg, implementation: str) -> Trainer:
    if implementation == "gradwise":
        return Trainer.from_config(cfg)

    seed_everything(cfg.seed)  # the same order as from_config, so a seed gives the same data and init
    data = build_data(cfg.data, context=cfg.model.context)
    model = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
    return Trainer(model, data.train, test_data=data.test, val_data=data.val, config=cfg, task=data.task,
                   optimizer=_pytorch_optimizer_lars(model, cfg))


def train_one(overrides: list[str], implementation: str = "gradwise") -> dict[str, Any]:
    """One run; a diverged run (a non-finite step, or a non-finite evaluation) scores accuracy 0."""
    cfg = load_config(None, [*COMMON, *overrides])
    trainer = _trainer(cfg, implementation)
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


def one_run(optimizer: str, batch: int, multiplier: float, s: dict[str, Any], cache: dict) -> dict[str, Any]:
    key = f"one|{optimizer}|{batch}|{multiplier:.6g}"
    if key in cache:
        return {**cache[key], "reused": True}
    overrides, base_lr, rule = OPTIMIZERS[optimizer]
    r = train_one([f"data.num_samples={s['num_samples']}", f"train.batch_size={batch}", f"train.epochs={s['epochs']}",
                   "schedule.name=cosine", "schedule.warmup_epochs=2", f"schedule.scale_rule={rule}",
                   "schedule.base_batch=32", f"optim.lr={base_lr * multiplier}", *overrides])
    return {"optimizer": optimizer, "batch_size": batch, "lr_multiplier": multiplier, **r}


def recipe_run(name: str, batch: int, multiplier: float, seed: int, s: dict[str, Any], cache: dict) -> dict[str, Any]:
    key = f"two|{name}|{batch}|{multiplier:.6g}|{seed}"
    if key in cache:
        return {**cache[key], "reused": True}
    optimizer, implementation, eta, power = RECIPES[name]
    rate = RECIPE_CENTRE[optimizer] * multiplier
    lr = rate / eta if eta else rate
    extra = [f"optim.trust_coefficient={eta}"] if eta else []
    r = train_one([f"data.num_samples={s['num_samples']}", f"train.batch_size={batch}", f"train.epochs={s['epochs']}",
                   f"seed={seed}", "schedule.name=poly", f"schedule.power={power}",
                   f"schedule.warmup_epochs={s['warmup_epochs']}", f"optim.lr={lr}",
                   *OPTIMIZERS[optimizer][0], *extra], implementation)
    return {"recipe": name, "batch_size": batch, "lr_multiplier": multiplier, "rate": rate, **r}


def score(run: dict[str, Any]) -> tuple[float, float]:
    """Validation accuracy; a run at chance level (or diverged) ranks below every other, and among those the
    smaller lr first, so a grid that is too hot everywhere extends downwards rather than following noise."""
    return (run["val_accuracy"], 0.0) if run["val_accuracy"] >= CHANCE else (-1.0, -run["lr"])


def search(run_at, grid, extensions: int, factor: float) -> dict[float, dict[str, Any]]:
    """Runs over the grid, extended by `factor` past an edge (up to `extensions` times) while the best
    (by `score`) sits there."""
    done = {m: run_at(m) for m in grid}
    for _ in range(extensions):
        best = max(done, key=lambda m: score(done[m]))
        if best == min(done):
            done[best / factor] = run_at(best / factor)
        elif best == max(done):
            done[best * factor] = run_at(best * factor)
        else:
            break
    return {m: done[m] for m in sorted(done)}


def _report(label: str, r: dict[str, Any]) -> dict[str, Any]:
    print(f"large-batch: batch {r['batch_size']:5d} {label} lr {r['lr']:.4g} seed {r['seed']}: val accuracy "
          f"{r['val_accuracy']:.3f} test {r['test_accuracy']:.3f} ({r['steps']} steps, {r['seconds']:.0f}s"
          f"{', reused' if r.get('reused') else ''})", flush=True)
    return r


def part_one(s: dict[str, Any], cache: dict) -> tuple[list[dict], dict]:
    runs, best = [], {}
    for batch in s["batches"]:
        for optimizer in OPTIMIZERS:
            done = search(lambda m, o=optimizer, b=batch: _report(f"{o:13s}", one_run(o, b, m, s, cache)),
                          s["sweep"], s["extensions"], 3.0)
            runs.extend(done.values())
            best[(optimizer, batch)] = max(done.values(), key=score)
    return runs, best


def part_two(s: dict[str, Any], cache: dict) -> tuple[list[dict], dict]:
    runs, chosen = [], {}
    for batch in s["recipe_batches"]:
        for name in RECIPES:
            done = search(lambda m, n=name, b=batch: _report(n, recipe_run(n, b, m, 0, s, cache)), s["recipe_grid"],
                          s["extensions"], 2.0)
            runs.extend(done.values())
            pick = max(done, key=lambda m: score(done[m]))
            seeds = [done[pick]] + [_report(name, recipe_run(name, batch, pick, seed, s, cache))
                                    for seed in s["recipe_seeds"] if seed != 0]
            runs.extend(seeds[1:])
            mean, half = mean_ci([r["test_accuracy"] for r in seeds])
            chosen[(name, batch)] = {"recipe": name, "batch_size": batch, "lr": done[pick]["lr"],
                                     "rate": done[pick]["rate"], "selection_val_accuracy": done[pick]["val_accuracy"],
                                     "grid_edge": pick in (min(done), max(done)),
                                     "test_accuracy": [r["test_accuracy"] for r in seeds], "mean": mean, "ci95": half}
    return runs, chosen


def _plot(best: dict, batches: list[int], chosen: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for optimizer in OPTIMIZERS:
        ax.plot(batches, [best[(optimizer, b)]["test_accuracy"] for b in batches], "o-", label=optimizer)
    for name in ("lars eta=1e-3", "lars eta=1e-2", "lamb"):
        bs = sorted(b for (n, b) in chosen if n == name)
        ax.errorbar(bs, [chosen[(name, b)]["mean"] for b in bs], yerr=[chosen[(name, b)]["ci95"] for b in bs],
                    fmt="s--", capsize=3, label=f"{name}, own recipe")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (equal epochs)")
    ax.set_ylabel("test accuracy (lr chosen on validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(out / "accuracy_vs_batch.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)


def _verdicts(best: dict, chosen: dict, s: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Per recipe batch: does LARS (LAMB) keep the small-batch accuracy (within 1 point, the interval's lower
    end above the bar), and do the two LARS differ? The trust coefficient is the one seed 0 validated best."""
    small = max(best[(o, s["batches"][0])]["test_accuracy"] for o in OPTIMIZERS)
    bar = small - 0.01
    lines, verdicts = [], {}
    for batch in s["recipe_batches"]:
        sgd = best[("sgd+momentum", batch)]["test_accuracy"] if ("sgd+momentum", batch) in best else None
        for optimizer, names in (("lars", [n for n in RECIPES if n.startswith("lars") and "pytorch" not in n]),
                                 ("lamb", ["lamb"])):
            top = max((chosen[(n, batch)] for n in names), key=lambda c: c["selection_val_accuracy"])
            low, high = top["mean"] - top["ci95"], top["mean"] + top["ci95"]
            if low >= bar:
                verdict = "held"
            elif high >= bar:
                verdict = "not shown (the interval spans the bar)"
            elif sgd is not None and low > sgd:
                verdict = "held partly (better than SGD+momentum, short of the small-batch accuracy)"
            else:
                verdict = "not held"
            verdicts[f"{optimizer}@{batch}"] = verdict
            lines.append(f"- batch {batch}, {optimizer} ({top['recipe']}): {top['mean']:.3f} ± {top['ci95']:.3f} vs "
                         f"{small:.3f} at batch {s['batches'][0]} (best optimizer) and SGD+momentum "
                         f"{'n/a' if sgd is None else f'{sgd:.3f}'} at this batch: **{verdict}**")
        for eta in ("1e-3", "1e-2"):
            ours, peer = chosen[(f"lars eta={eta}", batch)], chosen[(f"lars eta={eta} (pytorch-optimizer)", batch)]
            diff, bound = ours["mean"] - peer["mean"], math.hypot(ours["ci95"], peer["ci95"])
            verdicts[f"implementations agree eta={eta}@{batch}"] = abs(diff) <= bound
            lines.append(f"- batch {batch}, LARS eta={eta}: gradwise − pytorch-optimizer = {diff:+.3f} at lr "
                         f"{ours['lr']:.3g} / {peer['lr']:.3g} (bound {bound:.3f}, {len(s['recipe_seeds'])} "
                         "seeds: a weak test): "
                         f"{'no difference detected' if abs(diff) <= bound else 'they differ'}")
    return lines, verdicts


def run(out_dir: str, quick: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    s = settings(quick)
    cache = finished_runs(out / "results.json", s)
    t0 = time.perf_counter()
    runs, best = part_one(s, cache)
    recipe_runs, chosen = part_two(s, cache)
    minutes = (time.perf_counter() - t0) / 60
    trained = {"part_one": sum(r["seconds"] for r in runs) / 60,
               "part_two": sum(r["seconds"] for r in recipe_runs) / 60}
    reused = sum(bool(r.get("reused")) for r in [*runs, *recipe_runs])

    results = {"settings": settings_record(s), "machine": describe_machine(), "runs": runs, "recipe_runs": recipe_runs,
               "best": [best[(o, b)] for b in s["batches"] for o in OPTIMIZERS],
               "recipe": list(chosen.values()), "wall_minutes": minutes, "training_minutes": trained}
    lines = ["| batch | " + " | ".join(OPTIMIZERS) + " |", "|" + "---|" * (len(OPTIMIZERS) + 1)]
    for b in s["batches"]:
        cells = [f"{best[(o, b)]['test_accuracy']:.3f} (lr {best[(o, b)]['lr']:.3g})" for o in OPTIMIZERS]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    recipe_lines = ["| recipe | " + " | ".join(f"batch {b}" for b in s["recipe_batches"]) + " |",
                    "|" + "---|" * (len(s["recipe_batches"]) + 1)]
    for name in RECIPES:
        cells = []
        for b in s["recipe_batches"]:
            c = chosen[(name, b)]
            edge = ", grid edge" if c["grid_edge"] else ""
            cells.append(f"{c['mean']:.3f} ± {c['ci95']:.3f} (lr {c['lr']:.3g}{edge})")
        recipe_lines.append(f"| {name} | " + " | ".join(cells) + " |")
    drops = {o: best[(o, s["batches"][0])]["test_accuracy"] - best[(o, s["batches"][-1])]["test_accuracy"]
             for o in OPTIMIZERS}
    trust_lines = []
    for o in ("lars", "lamb"):
        for b in (s["batches"][0], s["batches"][-1]):
            shown = ", ".join(f"{k} {v:.3g}" for k, v in best[(o, b)]["trust_ratios"].items())
            trust_lines.append(f"- {o}, batch {b}: {shown}")
    verdict_lines, verdicts = _verdicts(best, chosen, s)
    results["verdicts"] = verdicts
    results["accuracy_drop_smallest_to_largest"] = drops
    grid = ", ".join(f"{m:g}" for m in s["recipe_grid"])
    md = [
        "# repro large-batch",
        "",
        f"Machine: {results['machine']}" + (" (quick run)" if quick else ""),
        f"Training time summed over the {len(runs) + len(recipe_runs)} runs: {sum(trained.values()):.1f} min (part "
        f"one {trained['part_one']:.1f}, part two {trained['part_two']:.1f}); this invocation's wall time "
        f"{minutes:.1f} min, {reused} runs reused from an earlier invocation into the same folder.",
        "",
        "Claim (seed 002; You et al. 2017, 2019): layer-wise adaptive rates (LARS for SGD, LAMB for Adam) keep "
        "the small-batch accuracy at batch sizes where SGD+momentum and Adam lose it (the papers: ImageNet "
        "convnets at batch 8K-32K with LARS, BERT at 32K-64K with LAMB, at about the small-batch accuracy).",
        "",
        "Verdict rule: **held** when the 95% interval's lower end is within 1 point of the best batch-32 "
        "accuracy (part one, any optimizer); **held partly** when the whole interval is short of that but above "
        "SGD+momentum at the same batch; **not shown** when the interval spans the bar.",
        "",
        f"MNIST-1D, {s['num_samples']} samples: 80% train of which 10% validation, 20% test; CNN channels "
        f"[32,32,32]; {s['epochs']} epochs at every batch size. Every lr is chosen on validation accuracy; the "
        "tables report test accuracy.",
        "",
        "## Part one: one recipe (2 warmup epochs, cosine, lr scaled with the batch)",
        "",
        f"Best over the sweep (x{', x'.join(f'{m:.3g}' for m in s['sweep'])} of the scaled rate, extended by "
        f"factors of 3 while the best was at an edge, at most {s['extensions']} times; a run below {CHANCE} "
        "validation accuracy ranks last, smaller lr first, so a grid that is too hot extends downwards); one "
        "seed; the lr shown is the winner.",
        "",
        *lines,
        "",
        "Accuracy lost from the smallest to the largest batch: "
        + ", ".join(f"{o} {d:+.3f}" for o, d in drops.items()).replace("+-", "-"),
        "",
        "Per-layer trust ratios at the end of the chosen run (LARS: its local lr factor "
        "eta*||w||/(||g||+wd||w||); LAMB: ||w||/||u||):",
        "",
        *trust_lines,
        "",
        "## Part two: the layer-wise optimizers' own recipe",
        "",
        f"{s['warmup_epochs']:g} warmup epochs then polynomial decay to 0 (power 2 for LARS, 1 for LAMB), no "
        f"scale rule: the rate the weights see (lr x eta for LARS, lr for LAMB) on a grid of "
        f"{RECIPE_CENTRE} x {{{grid}}} (extended by 2x at an edge), chosen on validation with seed 0, then "
        f"seeds {list(s['recipe_seeds'])} at the chosen rate: test accuracy mean ± 95% interval. For LARS "
        "without a trust clip, eta changes only the plain-SGD rate of the biases (lr = rate / eta); "
        "pytorch-optimizer's LARS is the same algorithm written independently (lr applied after the momentum, "
        "not inside it).",
        "",
        *recipe_lines,
        "",
        "## Verdict",
        "",
        *verdict_lines,
        "",
        "What differs from the papers: a 4-layer CNN on a 1-D synthetic task instead of ResNet/AlexNet on "
        "ImageNet or BERT; 20 epochs, so batch 8192 makes only 80 updates (the papers' largest batches still "
        "make thousands); one seed in part one.",
        "",
        "![accuracy vs batch](accuracy_vs_batch.png)",
        "",
    ]
    write_json(out / "results.json", results)
    write_text(out / "results.md", "\n".join(md))
    _plot(best, s["batches"], chosen, out)
    print("\n".join(md))
    return results
