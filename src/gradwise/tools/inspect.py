"""`gradwise inspect`: a few training steps, then a per-layer health table, the Jacobian measure
at initialisation and per-layer spectral norms."""

from __future__ import annotations

import json
from typing import Any

import torch

from gradwise.config import Config
from gradwise.data.sampler import EpochBatches
from gradwise.diagnostics.health import judge, layer_stats, weight_layers
from gradwise.diagnostics.spectra import (
    block_input,
    jacobian_mean_sq_singular_value,
    spectral_norms,
)
from gradwise.train import Trainer
from gradwise.train.batch import fetch_batch


def inspect_run(cfg: Config, steps: int = 5, probes: int = 8) -> dict[str, Any]:
    trainer = Trainer.from_config(cfg)
    model = trainer.model
    n = min(cfg.train.batch_size, len(trainer.train_data))
    inputs, _ = (t.to(trainer.engine.device) for t in fetch_batch(trainer.train_data, torch.arange(n)))
    model.eval()  # the Jacobian per sample, without batch-norm coupling or dropout
    chi = jacobian_mean_sq_singular_value(model.blocks, block_input(model, inputs), probes)
    model.train()
    init_norms = spectral_norms(model)
    batches = EpochBatches(len(trainer.train_data), cfg.train.batch_size, cfg.seed, cfg.train.drop_last)
    stats = []
    for _ in range(steps):
        x, y = (t.to(trainer.engine.device) for t in fetch_batch(trainer.train_data, batches.next()))
        before = [p.detach().clone() for _, p in weight_layers(model)]
        trainer.engine.train_step((x, y))
        stats = layer_stats(model, before)
    d = cfg.diagnostics
    verdict = judge(stats, d.vanishing_ratio, d.vanishing_norm, d.exploding_norm, d.exploding_update)
    return {
        "model": cfg.model.name, "blocks": len(model.blocks), "residual": cfg.model.block_residual,
        "norm": cfg.model.block_norm, "steps": steps,
        "jacobian_mean_sq_singular_value_at_init": chi, "probes": probes,
        "layers": [s.__dict__ for s in stats],
        "verdict": verdict.as_dict(),
        "spectral_norms_at_init": init_norms,
        "spectral_norms_after": spectral_norms(model),
    }


def format_report(report: dict[str, Any]) -> str:
    flagged = set(report["verdict"]["layers"])
    lines = [
        f"{report['model']} with {report['blocks']} blocks (residual={report['residual']}, norm={report['norm']}), "
        f"after {report['steps']} steps",
        "",
        "| layer | grad norm | weight norm | update/weight | spectral norm | flag |",
        "|---|---|---|---|---|---|",
    ]
    norms = report["spectral_norms_after"]
    for s in report["layers"]:
        module = s["name"].removesuffix(".weight")
        sigma = norms.get(module)
        lines.append(f"| {s['name']} | {s['grad_norm']:.3g} | {s['weight_norm']:.3g} | {s['update_ratio']:.3g} | "
                     f"{'-' if sigma is None else f'{sigma:.3g}'} | "
                     f"{report['verdict']['verdict'] if s['name'] in flagged else ''} |")
    v = report["verdict"]
    lines += [
        "",
        f"verdict: {v['verdict']}" + (f" ({len(v['layers'])} layers); try: {v['remedy']}" if v["layers"] else ""),
        f"input-output Jacobian of the blocks at init: mean squared singular value "
        f"{report['jacobian_mean_sq_singular_value_at_init']:.4g} (1 = dynamical isometry; "
        f"{report['probes']} random probes)",
    ]
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
