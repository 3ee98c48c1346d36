"""`gradwise repro async`: does delay compensation close asynchronous SGD's gap to sequential SGD?
(seed 003; Zheng et al. 2017, DC-ASGD; Ho et al. 2013, SSP; Zhang et al. 2016, staleness-aware)

MNIST-1D (4,000 training samples), a small CNN, plain SGD (no momentum: its
implicit interaction with staleness would confound the rules) at lr 0.2 with a
cosine schedule, batch 32 per gradient, and the same budget of gradient
computations for every method. Sequential SGD is one worker; SSGD averages one
gradient from each of M workers per update; the asynchronous rules apply each
gradient as it arrives. M = 4 and 8 workers on a local Ray, several seeds each
(asynchronous runs are not reproducible run to run). A second part makes one
of 4 workers 4x slower and compares wall time to a target test accuracy for
SSGD (which waits for it every round) and the asynchronous rules.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from gradwise.config import load_config
from gradwise.io import write_json, write_text, write_with

BASE = ["data.name=mnist1d", "data.num_samples=5000", "model.name=cnn", "model.channels=[32,32,32]",
        "model.kernel_sizes=[5,3,3]", "optim.name=sgd", "optim.momentum=0", "optim.lr=0.2", "schedule.name=cosine",
        "train.batch_size=32", "diagnostics.every=0", "log.progress=off", "log.plots=false",
        "train.checkpoint_every=1000000"]
RULES = {  # name -> ps overrides
    "SSGD": ["ps.rule=ssgd"],
    "ASGD": ["ps.rule=asgd"],
    "SSP (s=2)": ["ps.rule=ssp", "ps.staleness=2"],
    "staleness-aware": ["ps.rule=staleness-aware"],
    "DC-ASGD-c": ["ps.rule=dcasgd-c"],
    "DC-ASGD-a": ["ps.rule=dcasgd-a"],
}
STRAGGLER_RULES = ["SSGD", "ASGD", "DC-ASGD-a"]


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"gradients": 60, "eval_every": 30, "workers": [2], "seeds": [0], "rules": ["SSGD", "ASGD", "DC-ASGD-a"],
                "straggler": {"workers": 2, "slow": "1:3", "gradients": 60, "target": 0.0, "rules": ["ASGD"]}}
    return {"gradients": 2000, "eval_every": 250, "workers": [4, 8], "seeds": [0, 1, 2], "rules": list(RULES),
            "straggler": {"workers": 4, "slow": "3:4", "gradients": 2000, "target": 0.4, "rules": STRAGGLER_RULES}}


def one_run(name: str, workers: int, seed: int, s: dict[str, Any], out: Path, extra: list[str] | None = None,
            gradients: int | None = None, tag: str = "") -> dict[str, Any]:
    from gradwise.distributed.ps import train_async
    from gradwise.train.metrics import read_metrics

    overrides = [*BASE, f"seed={seed}", f"train.steps={gradients or s['gradients']}",
                 f"train.eval_every={s['eval_every']}", *(extra or [])]
    sequential = name == "sequential SGD"
    cfg = load_config(None, overrides + ([] if sequential else RULES[name]))
    slug = "".join(c for c in name.replace(" ", "_") if c.isalnum() or c in "_-")
    run_dir = out / "runs" / f"{slug}-M{workers}-s{seed}{tag}"
    t0 = time.perf_counter()
    summary = train_async(cfg, workers, run_dir, progress="off")
    seconds = time.perf_counter() - t0
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    return {
        "method": name, "workers": workers, "seed": seed, "test_accuracy": summary["test_accuracy"],
        "test_error": 1 - summary["test_accuracy"], "test_loss": summary["test_loss"],
        "updates": summary["updates"], "gradients": summary["gradients"],
        "staleness_mean": summary["staleness_mean"], "staleness_max": summary["staleness_max"],
        "staleness_histogram": summary["staleness_histogram"], "seconds": round(seconds, 2),
        "curve": [{"gradients": r["step"], "updates": r["updates"], "time": r["time"],
                   "test_accuracy": r["test_accuracy"]} for r in evals],
    }


def _report(r: dict[str, Any]) -> None:
    print(f"async: {r['method']:16s} M={r['workers']} seed {r['seed']}: test error {r['test_error']:.3f}, "
          f"staleness mean {r['staleness_mean']:.2f} max {r['staleness_max']}, {r['updates']} updates, "
          f"{r['seconds']:.0f}s", flush=True)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def time_to_target(curve: list[dict[str, Any]], target: float) -> float | None:
    return next((p["time"] for p in curve if p["test_accuracy"] >= target), None)


def _plots(runs: list[dict[str, Any]], s: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["sequential SGD", *s["rules"]]
    fig, axes = plt.subplots(1, len(s["workers"]), figsize=(6 * len(s["workers"]), 4.2), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], s["workers"]):
        for i, method in enumerate(methods):
            mine = [r for r in runs if r["method"] == method and (r["workers"] == m or method == "sequential SGD")]
            if not mine:
                continue
            n = min(len(r["curve"]) for r in mine)
            xs = [mine[0]["curve"][k]["updates"] for k in range(n)]
            ys = [statistics.fmean(r["curve"][k]["test_accuracy"] for r in mine) for k in range(n)]
            ax.plot(xs, ys, "o-", markersize=3, color=f"C{i}", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("updates applied (log)")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_title(f"M = {m} workers, equal gradient computations", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_with(out / "accuracy_vs_updates.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, len(s["workers"]), figsize=(6 * len(s["workers"]), 4), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], s["workers"]):
        for i, method in enumerate(s["rules"]):
            counts: dict[int, int] = {}
            for r in runs:
                if r["method"] == method and r["workers"] == m:
                    for k, v in r["staleness_histogram"].items():
                        counts[int(k)] = counts.get(int(k), 0) + v
            if counts:
                keys = sorted(counts)
                total = sum(counts.values())
                ax.plot(keys, [counts[k] / total for k in keys], "o-", markersize=3, color=f"C{i + 1}", label=method)
        ax.set_xlabel("staleness (updates between pull and push)")
        ax.set_ylabel("fraction of gradients")
        ax.set_title(f"M = {m} workers", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_with(out / "staleness_histogram.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)


def run(out_dir: str, quick: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    s = settings(quick)
    runs: list[dict[str, Any]] = []
    for seed in s["seeds"]:
        r = one_run("sequential SGD", 1, seed, s, out)
        runs.append(r)
        _report(r)
    for m in s["workers"]:
        for name in s["rules"]:
            for seed in s["seeds"]:
                r = one_run(name, m, seed, s, out)
                runs.append(r)
                _report(r)
    seq_err, seq_sd = _mean_sd([r["test_error"] for r in runs if r["method"] == "sequential SGD"])
    table = ["| method | " + " | ".join(f"M={m}: test error" for m in s["workers"]) + " | "
             + " | ".join(f"M={m}: staleness mean / max" for m in s["workers"]) + " |",
             "|---|" + "---|" * (2 * len(s["workers"]))]
    table.append("| sequential SGD | " + " | ".join(f"{seq_err:.3f} ± {seq_sd:.3f}" for _ in s["workers"])
                 + " | " + " | ".join("0 / 0" for _ in s["workers"]) + " |")
    rows = [{"method": "sequential SGD", "workers": 1, "test_error": seq_err, "test_error_sd": seq_sd}]
    for name in s["rules"]:
        errs, stale = [], []
        for m in s["workers"]:
            mine = [r for r in runs if r["method"] == name and r["workers"] == m]
            e, sd = _mean_sd([r["test_error"] for r in mine])
            sm = statistics.fmean(r["staleness_mean"] for r in mine)
            smax = max(r["staleness_max"] for r in mine)
            rows.append({"method": name, "workers": m, "test_error": e, "test_error_sd": sd,
                         "staleness_mean": sm, "staleness_max": smax})
            errs.append(f"{e:.3f} ± {sd:.3f}")
            stale.append(f"{sm:.2f} / {smax}")
        table.append(f"| {name} | " + " | ".join(errs) + " | " + " | ".join(stale) + " |")

    by = {(r["method"], r["workers"]): r["test_error"] for r in rows}
    verdicts = []
    for m in s["workers"]:
        if ("ASGD", m) in by:
            gap = by[("ASGD", m)] - seq_err
            for dc in ("DC-ASGD-c", "DC-ASGD-a"):
                if (dc, m) in by:
                    closed = (by[("ASGD", m)] - by[(dc, m)]) / gap if gap > 0 else float("nan")
                    verdicts.append(f"- M={m}: ASGD is {gap:+.3f} test error from sequential SGD; {dc} closes "
                                    f"{closed:.0%} of that gap ({by[(dc, m)]:.3f} vs ASGD {by[('ASGD', m)]:.3f}).")

    st = s["straggler"]
    straggler_runs = []
    for name in st["rules"]:
        if name not in s["rules"]:
            continue
        r = one_run(name, st["workers"], 0, s, out, extra=[f"ps.slowdown={st['slow']}"], gradients=st["gradients"],
                    tag="-straggler")
        r["time_to_target"] = time_to_target(r["curve"], st["target"])
        straggler_runs.append(r)
        _report(r)
    straggler_table = ["| method | wall time to test accuracy " + f"{st['target']} (s) | final test accuracy "
                       "| total wall time (s) |", "|---|---|---|---|"]
    for r in straggler_runs:
        ttt = f"{r['time_to_target']:.1f}" if r["time_to_target"] is not None else "not reached"
        straggler_table.append(f"| {r['method']} | {ttt} | {r['test_accuracy']:.3f} | {r['curve'][-1]['time']:.1f} |")

    from gradwise.bench import describe_machine

    results = {"settings": s, "base": BASE, "rules": RULES, "machine": describe_machine(), "table": rows,
               "runs": runs, "straggler": straggler_runs, "claims": verdicts}
    _plots(runs, s, out)
    md = [
        "# repro async",
        "",
        f"Machine: {results['machine']}" + (" (quick run)" if quick else ""),
        "",
        f"MNIST-1D (4,000 train / 1,000 test), CNN [32,32,32], plain SGD lr 0.2 (no momentum) with a cosine "
        f"schedule over the updates, batch 32 per gradient, {s['gradients']} gradient computations for every "
        f"method; mean ± sd over seeds {s['seeds']}. Workers are Ray actors on this machine; the server applies "
        "each gradient as the rule says. Test error at the end:",
        "",
        *table,
        "",
        "## Does delay compensation close the gap? (the seed's claim)",
        "",
        *verdicts,
        "",
        f"## One straggler: worker {st['slow'].split(':')[0]} of {st['workers']} is {st['slow'].split(':')[1]}x "
        f"slower ({st['gradients']} gradients)",
        "",
        *straggler_table,
        "",
        "![accuracy vs updates](accuracy_vs_updates.png)",
        "![staleness histogram](staleness_histogram.png)",
        "",
    ]
    write_json(out / "results.json", results)
    write_text(out / "results.md", "\n".join(md))
    print("\n".join(md))
    return results
