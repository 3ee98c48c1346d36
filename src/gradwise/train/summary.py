"""A run's summary: the figures `Trainer.fit` returns and writes to summary.json."""

from __future__ import annotations

from typing import Any

from gradwise.checkpoint.format import params_sha256


def run_summary(trainer) -> dict[str, Any]:
    """Losses and metrics of the last evaluation, length, speed, the parameters' digest and what was trained."""
    s, engine, model = trainer.state, trainer.engine, trainer.model
    return {
        "final_train_loss": s.last_train_loss, **s.last_eval, "steps": s.step,
        "skipped_steps": engine.precision.skipped_steps, "epochs": trainer.epochs_done(),
        **({"loss_scale": engine.precision.scale} if engine.precision.scale is not None else {}),
        "wall_seconds": round(s.elapsed_seconds, 3),
        "samples_per_second": s.samples_seen / max(s.elapsed_seconds, 1e-9),
        "params_sha256": params_sha256(model),
        "num_parameters": sum(p.numel() for p in model.parameters()), "task": trainer.task,
        "model_class": type(model).__name__, "data_class": type(trainer.train_data).__name__,
        "train_samples": trainer.train_size, "resumed_from": s.resumed_from, "rollbacks": s.rollbacks,
        "world_size": trainer.sync.world_size, "restarts": trainer.sync.restarts, "health": s.health,
        **({"penalty": float(engine.last_penalty)} if engine.last_penalty is not None else {}),
    }
