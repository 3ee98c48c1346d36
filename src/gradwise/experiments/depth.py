"""`gradwise repro depth`: do residual variants keep very deep networks trainable? (seeds 000, 003, 004;
Bachlechner et al. 2020 ReZero, Srivastava et al. 2015 Highway)

1. Fully-connected nets on MNIST-1D at several depths for plain / residual / residual+LayerNorm /
   ReZero / Highway blocks: the Jacobian measure at init and the loss after a fixed step budget.
2. A 10,000-block ReZero fully-connected net (sqrt activation checkpointing): loss at the start
   and end, wall time and memory.
3. Character transformers at 12 and 128 layers, post-LN vs pre-LN vs ReZero, one lr, no warmup:
   which train and which diverge.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from gradwise.config import load_config
from gradwise.diagnostics.spectra import block_input, jacobian_mean_sq_singular_value
from gradwise.errors import NonFiniteError
from gradwise.io import write_json, write_text
from gradwise.memory.measure import ActivationMeter, format_bytes
from gradwise.train import Callback, Trainer

FC_VARIANTS = {
    "plain": ["model.residual=none", "model.norm=none"],
    "residual": ["model.residual=residual", "model.norm=none"],
    "residual+layernorm": ["model.residual=residual", "model.norm=layer"],
    "rezero": ["model.residual=rezero", "model.norm=none"],
    "highway": ["model.residual=highway", "model.norm=none"],
}
TRANSFORMER_VARIANTS = {
    "post-LN": ["model.residual=residual", "model.norm=layer", "model.norm_position=post"],
    "pre-LN": ["model.residual=residual", "model.norm=layer", "model.norm_position=pre"],
    "rezero": ["model.residual=rezero", "model.norm=none"],
}


class LossRecorder(Callback):
    """Every step's training loss (a float per step)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, trainer, out) -> None:
        self.losses.append(float(out.loss))


def train(overrides: list[str]) -> dict[str, Any]:
    """Train one config in memory; a non-finite step ends the run and counts as diverged."""
    cfg = load_config(None, ["log.progress=off", "train.eval_every=1000000", "diagnostics.every=0", *overrides])
    recorder = LossRecorder()
    trainer = Trainer.from_config(cfg, callbacks=[recorder])
    x, _ = (t[: cfg.train.batch_size] for t in trainer.train_data.tensors)
    trainer.model.eval()
    chi = jacobian_mean_sq_singular_value(trainer.model.blocks, block_input(trainer.model, x), probes=4)
    trainer.model.train()
    losses = recorder.losses
    t0 = time.perf_counter()
    outcome, summary = "trained", {}
    try:
        summary = trainer.fit()
    except NonFiniteError as err:
        outcome = f"diverged: {str(err).split(';')[0]}"
    seconds = time.perf_counter() - t0
    first = sum(losses[:5]) / max(1, len(losses[:5]))
    last = sum(losses[-10:]) / max(1, len(losses[-10:]))
    if outcome == "trained" and not (math.isfinite(last) and last < 0.8 * first):
        outcome = "learning slowly" if math.isfinite(last) and last < 0.95 * first else "did not train"
    return {"jacobian_at_init": chi, "first_loss": first, "final_loss": last, "min_loss": min(losses, default=math.nan),
            "steps_done": len(losses), "outcome": outcome, "seconds": round(seconds, 2),
            "test_accuracy": summary.get("test_accuracy"), "test_bpc": summary.get("test_bpc"), "trainer": trainer}


def fc_table(depths: list[int], steps: int) -> list[dict[str, Any]]:
    rows = []
    for depth in depths:
        for name, variant in FC_VARIANTS.items():
            r = train(["model.name=mlp", f"model.depth={depth + 1}", "model.width=64", "model.activation=tanh",
                       "train.batch_size=128", f"train.steps={steps}", "optim.name=adam", "optim.lr=0.001",
                       "schedule.name=constant", *variant])
            r.pop("trainer")
            rows.append({"depth": depth, "variant": name, **r})
            print(f"depth: {depth:4d} blocks {name:18s} chi {r['jacobian_at_init']:.3g}  loss "
                  f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}  {r['outcome']}", flush=True)
    return rows


def very_deep(blocks: int, steps: int) -> dict[str, Any]:
    r = train(["model.name=mlp", f"model.depth={blocks + 1}", "model.width=32", "model.activation=tanh",
               "model.residual=rezero", "model.norm=none", "memory.checkpoint=sqrt", "train.batch_size=64",
               f"train.steps={steps}", "optim.name=lamb", "optim.lr=0.003", "optim.eps=1e-6",
               "schedule.name=constant", "train.eval_batch_size=1000"])
    trainer = r.pop("trainer")
    x, _ = (t[:64] for t in trainer.train_data.tensors)
    meter = ActivationMeter(trainer.model)
    with meter.track():
        trainer.model(x)
    r.update({"blocks": blocks, "activation_bytes_kept_per_step": meter.bytes,
              "params": sum(p.numel() for p in trainer.model.parameters()),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "alpha_abs_mean_after": float(torch.stack([b.alpha.detach().abs() for b in trainer.model.blocks]).mean())})
    print(f"depth: {blocks} ReZero blocks: loss {r['first_loss']:.3f} -> {r['final_loss']:.3f} in {r['seconds']}s, "
          f"{format_bytes(meter.bytes)} activations kept, peak RSS {format_bytes(r['peak_rss_bytes'])}", flush=True)
    return r


def transformers(layers: list[int], steps: int) -> list[dict[str, Any]]:
    rows = []
    for n_layer in layers:
        for name, variant in TRANSFORMER_VARIANTS.items():
            r = train(["data.name=text", "data.max_chars=200000", "model.name=transformer", f"model.n_layer={n_layer}",
                       "model.d_model=64", "model.n_head=4", "model.context=32", "train.batch_size=16",
                       f"train.steps={steps}", "optim.name=adam", "optim.lr=0.001", "schedule.name=constant",
                       "schedule.warmup_steps=0", "train.eval_batch_size=256", *variant])
            r.pop("trainer")
            rows.append({"layers": n_layer, "variant": name, **r})
            print(f"depth: transformer {n_layer:3d} layers {name:7s} loss {r['first_loss']:.3f} -> "
                  f"{r['final_loss']:.3f}  {r['outcome']}", flush=True)
    return rows


def _plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradwise.io import write_with

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    rows = results["fc"]
    depths = sorted({r["depth"] for r in rows})
    for name in FC_VARIANTS:
        pts = [next(r for r in rows if r["depth"] == d and r["variant"] == name) for d in depths]
        axes[0].loglog(depths, [max(p["jacobian_at_init"], 1e-30) for p in pts], "o-", label=name)
        axes[1].semilogx(depths, [p["final_loss"] if math.isfinite(p["final_loss"]) else float("nan") for p in pts],
                         "o-", label=name)
    axes[0].set_xlabel("blocks")
    axes[0].set_ylabel("Jacobian mean sq. singular value at init")
    axes[1].set_xlabel("blocks")
    axes[1].set_ylabel(f"train loss after {results['settings']['fc_steps']} steps")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(out / "depth.png", lambda h: fig.savefig(h, format="png"))
    plt.close(fig)


def run(out_dir: str, quick: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    s = ({"depths": [4, 16], "fc_steps": 30, "deep_blocks": 200, "deep_steps": 10, "layers": [2, 8], "t_steps": 10}
         if quick else
         {"depths": [8, 32, 128], "fc_steps": 400, "deep_blocks": 10_000, "deep_steps": 150, "layers": [12, 128],
          "t_steps": 150})
    results: dict[str, Any] = {"settings": s}
    results["fc"] = fc_table(s["depths"], s["fc_steps"])
    results["very_deep"] = very_deep(s["deep_blocks"], s["deep_steps"])
    results["transformers"] = transformers(s["layers"], s["t_steps"])
    from gradwise.bench import describe_machine

    results["machine"] = describe_machine()
    fc_lines = ["| blocks | variant | Jacobian at init | loss first -> last | outcome |", "|---|---|---|---|---|"]
    for r in results["fc"]:
        fc_lines.append(f"| {r['depth']} | {r['variant']} | {r['jacobian_at_init']:.3g} | "
                        f"{r['first_loss']:.3f} -> {r['final_loss']:.3f} | {r['outcome']} |")
    t_lines = ["| layers | variant | loss first -> last | outcome |", "|---|---|---|---|"]
    for r in results["transformers"]:
        t_lines.append(f"| {r['layers']} | {r['variant']} | {r['first_loss']:.3f} -> {r['final_loss']:.3f} | "
                       f"{r['outcome']} |")
    d = results["very_deep"]
    md = [
        "# repro depth", "", f"Machine: {results['machine']}" + (" (quick run)" if quick else ""), "",
        f"## Fully-connected nets (MNIST-1D, width 64, tanh, Adam lr 1e-3, {s['fc_steps']} steps)", "",
        "Jacobian at init: mean squared singular value of the block stack's input-output Jacobian "
        "(1 = signals neither vanish nor explode). Loss: mean of the first 5 and last 10 steps. "
        "Outcome: 'trained' when the last is below 0.8x the first, 'learning slowly' below 0.95x, else "
        "'did not train'; 'diverged' when a step went non-finite.", "", *fc_lines, "",
        f"## {d['blocks']:,} ReZero blocks (width 32, sqrt checkpointing, LAMB lr 3e-3, batch 64)", "",
        f"- loss {d['first_loss']:.3f} at the start -> {d['final_loss']:.3f} after {d['steps_done']} steps "
        f"({d['outcome']}); test accuracy {d['test_accuracy']}",
        f"- wall time {d['seconds']} s; activations kept per step {format_bytes(d['activation_bytes_kept_per_step'])}; "
        f"peak resident memory of the process {format_bytes(d['peak_rss_bytes'])}; {d['params']:,} parameters",
        f"- Jacobian at init {d['jacobian_at_init']:.3g}; mean |alpha| after training {d['alpha_abs_mean_after']:.3g}",
        "", f"## Character transformers (d_model 64, context 32, Adam lr 1e-3, no warmup, {s['t_steps']} steps)", "",
        *t_lines, "", "![depth](depth.png)", "",
    ]
    write_json(out / "results.json", results)
    write_text(out / "results.md", "\n".join(md))
    _plot(results, out)
    print("\n".join(md))
    return results
