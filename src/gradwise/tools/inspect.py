"""`gradwise inspect`: a few training steps, then a per-layer health table, the Jacobian measure at initialisation
(over the model's block stack, or a model of yours' repeated blocks) and per-layer spectral norms.

`inspect_run(cfg)` inspects the configured built-in run; `inspect_model(model, data, ...)` (`gradwise.inspect`)
a model and data of yours, with Trainer's arguments and first-batch check.
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from gradwise.arguments import check_callbacks, check_count, config_argument
from gradwise.config import Config
from gradwise.diagnostics.health import judge, layer_stats, weight_layers
from gradwise.diagnostics.spectra import chain_jacobian, spectral_norms
from gradwise.memory.checkpointing import CheckpointedSegments, repeated_blocks
from gradwise.train import Callback, Trainer
from gradwise.train.batch import call_model, to_device
from gradwise.train.randomness import isolated_rng


def inspection_config(cfg: Config | None) -> Config:
    """The run as inspected: no progress bar, no health records, no compilation (a few steps, hooks)."""
    cfg = config_argument("config", cfg).thawed()
    cfg.log.progress, cfg.diagnostics.every, cfg.train.compile = "off", 0, False
    cfg.train.eval_every = cfg.train.checkpoint_every = cfg.early_stopping.patience = None  # it never evaluates
    cfg.memory.auto = False  # the run as configured, not as a plan would change it
    return cfg


def block_chain(model: nn.Module) -> tuple[nn.Module, nn.Module, int, str] | None:
    """(first block, last block, how many, their class) of the model's block stack, or of its repeated blocks."""
    stacks = [m for m in model.modules() if isinstance(m, CheckpointedSegments)]
    if stacks:
        return stacks[0], stacks[0], len(stacks[0]), type(stacks[0][0]).__name__
    names = repeated_blocks(model)
    for container in model.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            blocks = [c for c in container.children() if type(c).__name__ in names]
            if len(blocks) >= 2:
                return blocks[0], blocks[-1], len(blocks), type(blocks[0]).__name__
    return None


class LayerRecorder(Callback):
    """Each step's per-layer norms and update ratios (the last step's are kept)."""

    def __init__(self):
        self.before, self.stats = None, []

    def on_step_start(self, trainer) -> None:
        self.before = [p.detach().clone() for _, p in weight_layers(trainer.model)]

    def on_step_end(self, trainer, out) -> None:
        self.stats = layer_stats(trainer.model, self.before)


def inspect_trainer(trainer: Trainer, recorder: LayerRecorder, steps: int = 5, probes: int = 8) -> dict[str, Any]:
    """The Jacobian and spectral norms at initialisation, then `steps` training steps (no evaluation) and the
    per-layer health table with its verdict (`recorder`: one of the trainer's callbacks)."""
    model, cfg = trainer.model, trainer.cfg
    chain = block_chain(model)
    chi = None
    if chain is not None:
        batch = to_device(trainer.data["train"].first_batch(min(cfg.train.batch_size, 16)), trainer.engine.device)
        model.eval()  # the Jacobian per sample, without batch-norm coupling or dropout
        try:
            chi = chain_jacobian(chain[0], chain[1], lambda: call_model(model, batch), probes)
        except (TypeError, RuntimeError) as err:  # blocks that are not a chain of hidden states: no figure
            chain, chi = (*chain[:3], f"{chain[3]} ({err})"), None
        finally:
            model.train()
    init_norms = spectral_norms(model)
    trainer.data["val"] = trainer.data["test"] = None  # inspection trains; it never evaluates
    trainer.fit(max_steps=steps)
    d = cfg.diagnostics
    verdict = judge(recorder.stats, d.vanishing_ratio, d.vanishing_norm, d.exploding_norm, d.exploding_update)
    builtin = trainer.configured and cfg.model.factory is None
    return {
        "model": cfg.model.name if builtin else type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "blocks": chain[2] if chain else 0, "block_class": chain[3] if chain else None,
        "residual": cfg.model.block_residual if builtin else None, "norm": cfg.model.block_norm if builtin else None,
        "steps": steps, "jacobian_mean_sq_singular_value_at_init": chi, "probes": probes,
        "layers": [s.__dict__ for s in recorder.stats],
        "verdict": verdict.as_dict(),
        "spectral_norms_at_init": init_norms,
        "spectral_norms_after": spectral_norms(model),
    }


def inspect_run(cfg: Config, steps: int = 5, probes: int = 8) -> dict[str, Any]:
    """Inspect the configured built-in model and data."""
    recorder = LayerRecorder()
    with isolated_rng(cfg.seed):
        trainer = Trainer.from_config(inspection_config(cfg), callbacks=[recorder])
        return inspect_trainer(trainer, recorder, steps, probes)


def inspect_model(model: nn.Module, train_data: Any, *, config: Config | None = None, steps: int = 5,
                  probes: int = 8, **trainer_args: Any) -> dict[str, Any]:
    """Inspect your model on your data: `trainer_args` are Trainer's (loss_fn, collate_fn, count_fn, task, ...);
    the same first-batch check and one-line errors. The model trains for `steps` steps (pass a copy to keep it)."""
    check_count("steps", steps)
    check_count("probes", probes)
    check_callbacks("callbacks", trainer_args.setdefault("callbacks", []))
    recorder = LayerRecorder()
    cfg = inspection_config(config)
    with isolated_rng(cfg.seed):  # seeded by the config; the caller's generators are left as they were
        trainer = Trainer(model, train_data, config=cfg, callbacks=[*trainer_args.pop("callbacks"), recorder],
                          **trainer_args)
        return inspect_trainer(trainer, recorder, steps, probes)


def format_report(report: dict[str, Any]) -> str:
    flagged = set(report["verdict"]["layers"])
    if report["residual"] is not None:
        about = f"residual={report['residual']}, norm={report['norm']}"
    else:
        about = f"{report['parameters']:,} parameters" + (f", blocks: {report['block_class']}"
                                                          if report["block_class"] else "")
    lines = [
        f"{report['model']} with {report['blocks']} blocks ({about}), after {report['steps']} steps",
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
    chi = report["jacobian_mean_sq_singular_value_at_init"]
    lines += [
        "",
        f"verdict: {v['verdict']}" + (f" ({len(v['layers'])} layers); try: {v['remedy']}" if v["layers"] else ""),
        (f"input-output Jacobian of the blocks at init: mean squared singular value {chi:.4g} (1 = dynamical "
         f"isometry; {report['probes']} random probes)") if chi is not None else
        "input-output Jacobian: no repeated blocks found to measure it over",
    ]
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
