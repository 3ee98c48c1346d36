"""Built-in callbacks that act on a cadence: evaluation, checkpoints, early stopping, gradient health.

Their order in the trainer matters and is fixed: evaluate (early stopping
decides on it), then checkpoint, then early stopping's end of run (message,
restore the best weights, evaluate them). After the last step, however the run
ended, `on_train_end` evaluates and checkpoints once more unless that step
already was.
"""

from __future__ import annotations

from typing import Any

from gradwise.config import Config
from gradwise.diagnostics.health import judge, layer_stats, weight_layers, zero_gradient_layers
from gradwise.errors import ConfigError
from gradwise.train.callbacks.base import Callback, StepOutput
from gradwise.train.early_stopping import EarlyStopping
from gradwise.checkpoint.format import BEST_WEIGHTS


class Cadenced(Callback):
    """Acts every `every(cfg)` steps (None: never on a cadence) and at the run's last step; after the last step
    (however the run ended) once more, unless that step already did."""

    def __init__(self):
        self.done_at: int | None = None

    def every(self, cfg: Config) -> int | None:
        raise NotImplementedError

    def act(self, trainer) -> None:
        raise NotImplementedError

    def on_step_end(self, trainer, out: StepOutput) -> None:
        state = trainer.state
        every = self.every(trainer.cfg)
        if (every and state.step % every == 0) or state.step == state.end:
            self._act(trainer)

    def on_train_end(self, trainer) -> None:
        if self.done_at != trainer.state.step:
            self._act(trainer)

    def _act(self, trainer) -> None:
        self.done_at = trainer.state.step
        self.act(trainer)


class Evaluator(Cadenced):
    """Validation and test figures every `train.eval_every` steps and at the end: a `kind: eval` record."""

    def every(self, cfg: Config) -> int | None:
        return cfg.train.eval_every

    def act(self, trainer) -> None:
        state = trainer.state
        state.last_eval = trainer.evaluate_all()
        if state.last_eval:
            trainer.log({"kind": "eval", "step": state.step, **trainer.source.record_fields(),
                         "time": round(trainer.wall_seconds(), 3), **state.last_eval})
        trainer.callbacks.fire("on_evaluate", trainer, state.last_eval)

    def state_dict(self, trainer) -> dict[str, Any]:
        return {"step": self.done_at, "results": dict(trainer.state.last_eval)}

    def load_state_dict(self, trainer, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.done_at, trainer.state.last_eval = state.get("step"), dict(state.get("results") or {})


class Checkpointer(Cadenced):
    """checkpoints/last.pt every `train.checkpoint_every` steps and at the end."""

    def every(self, cfg: Config) -> int | None:
        return cfg.train.checkpoint_every

    def act(self, trainer) -> None:
        trainer.save_checkpoint()


class EarlyStop(Callback):
    """Stops when a validation metric stops improving (`early_stopping.*`); ends with the best weights.

    The metric is any one the evaluation reports: `val_loss`, the task's `val_accuracy` or `val_bpc`, or
    `val_NAME` for a metric of the user's (`metrics={"NAME": ...}`); whether higher is better comes from
    `early_stopping.mode`, else from the name (accuracy: higher; loss, bpc: lower) or the metric object's
    `higher_is_better` (torchmetrics sets it).
    """

    def __init__(self, cfg: Config, task: str, val_data, metrics: dict | None = None):
        es, metrics = cfg.early_stopping, metrics or {}
        if val_data is None or len(val_data) == 0:
            raise ConfigError(
                f"config error: early_stopping.patience={es.patience} needs a validation set; set "
                "data.val_fraction (e.g. 0.1) or pass val_data (the test set is never used to stop)"
            )
        builtin = {"val_loss": False, **({"classification": {"val_accuracy": True},
                                           "language_model": {"val_bpc": False}}.get(task, {}))}
        reported = [*builtin, *(f"val_{name}" for name in metrics)]
        if es.metric not in reported:
            raise ConfigError(f"config error: early_stopping.metric={es.metric} is not reported for this run "
                              f"(a {task} task; allowed: {', '.join(reported)})")
        higher = {"min": False, "max": True}.get(es.mode) if es.mode else builtin.get(es.metric)
        if higher is None:
            higher = getattr(metrics[es.metric.removeprefix("val_")], "higher_is_better", None)
        if not isinstance(higher, bool):
            raise ConfigError(f"config error: early_stopping.metric={es.metric} needs early_stopping.mode=max "
                              "(higher is better) or min (lower is better)")
        self.metric = es.metric
        self.tracker = EarlyStopping(es, higher)

    def on_evaluate(self, trainer, results: dict[str, float]) -> None:
        if self.tracker.update(results[self.metric], trainer.state.step, trainer.model):
            trainer.state.should_stop = True

    def on_train_end(self, trainer) -> None:
        state, t = trainer.state, self.tracker
        if t.stopped_at == state.step:
            trainer.message(f"early stopping at step {state.step}: {self.metric} has not improved for "
                            f"{t.bad_evaluations} evaluations (best {t.best_value:.4g} at step {t.best_step})")
        if self.tracker.restore(trainer.model):
            state.last_eval = trainer.evaluate_all()
            trainer.log({"kind": "eval", "step": state.step, "restored_from_step": self.tracker.best_step,
                         **state.last_eval})

    def state_dict(self, trainer) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, trainer, state: dict[str, Any] | None) -> None:
        if state:
            self.tracker.load_state_dict(state)

    def on_checkpoint_save(self, trainer, payload: dict[str, Any]) -> None:
        if self.tracker.best_weights is not None:  # shaped like the model: sharded with it under FSDP
            payload.setdefault("model_states", {})[BEST_WEIGHTS] = self.tracker.best_weights

    def on_checkpoint_load(self, trainer, payload: dict[str, Any]) -> None:
        self.tracker.best_weights = payload.get("model_states", {}).get(BEST_WEIGHTS)

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        summary["early_stopping"] = self.tracker.summary()


class GradientHealth(Callback):
    """Per-layer gradient and update figures every `diagnostics.every` steps: a `kind: health` record and a
    message (with a remedy) when the verdict turns vanishing, dead or exploding."""

    def __init__(self):
        self.before = None
        self.zero_before: set[str] = set()  # layers with an exactly-zero gradient at the previous check

    def on_step_start(self, trainer) -> None:
        every = trainer.cfg.diagnostics.every
        due = every and (trainer.state.step + 1) % every == 0
        self.before = [p.detach().clone() for _, p in weight_layers(trainer.model)] if due else None

    def on_step_end(self, trainer, out: StepOutput) -> None:
        if self.before is None:
            return
        d, state = trainer.cfg.diagnostics, trainer.state
        stats = layer_stats(trainer.model, self.before, trainer.sync.shard_sum)
        self.before = None
        verdict = judge(stats, d.vanishing_ratio, d.vanishing_norm, d.exploding_norm, d.exploding_update,
                        self.zero_before)
        self.zero_before = zero_gradient_layers(stats)
        if verdict.verdict != "healthy" and (state.health or {}).get("verdict") != verdict.verdict:
            trainer.message(f"gradient health at step {state.step}: {verdict.verdict} in "
                            f"{', '.join(verdict.layers[:4])}; try: {verdict.remedy}")
        state.health = {"step": state.step, **verdict.as_dict()}
        trainer.log({"kind": "health", **state.health, "per_layer": [s.__dict__ for s in stats]})

