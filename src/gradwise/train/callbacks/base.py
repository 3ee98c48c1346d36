"""The callback events, the run's state they read, and the list that fires them.

A callback subclasses `Callback` and overrides the events it needs; each gets
the `Trainer` (its `state`, `engine`, `model`, `cfg`, `sync`) and may call
`trainer.log(record)`, `trainer.message(text)`, `trainer.evaluate_all()` or
set `trainer.state.should_stop`. Events, in the order a run meets them:

    on_fit_start(trainer)                    before the first step of this `fit` call
    on_step_start(trainer)                   before each step
    on_step_end(trainer, out)                after each applied step (`out`: a StepOutput)
    on_train_end(trainer)                    after the last step (the run's end, or a callback stopped it):
                                             the final train record, evaluation and checkpoint
    on_evaluate(trainer, results)            after an evaluation ({"val_loss": ..., "test_accuracy": ...})
    on_log(trainer, record)                  for every metrics record (train, eval, health, scaler, ...)
    on_message(trainer, text)                for every human-readable message
    on_checkpoint_save(trainer, payload)     while a checkpoint is built (the whole payload: for state shaped
                                             like the model, `payload["model_states"][name]`)
    on_checkpoint_load(trainer, payload)     after a checkpoint was loaded
    on_exception(trainer, error)             when `fit` ends with an exception (then it propagates)
    on_fit_end(trainer, summary)             after the last step: add to `summary` before it is written

A callback's own state goes into checkpoints through `state_dict(trainer)` and
comes back through `load_state_dict(trainer, state)` (None when the checkpoint
has none), kept under `payload["callbacks"][key]`, its key being its class name
(`state_key` to choose another; repeats are numbered), so no two callbacks can
write over each other's keys. A step source keeps its state the same way.

Built-in callbacks come first in a fixed order, the user's after them, so a
user callback sees every built-in record and the final summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gradwise.data.sampler import Position
from gradwise.arguments import check_type

EVENTS = ("on_fit_start", "on_step_start", "on_step_end", "on_train_end", "on_evaluate", "on_log", "on_message",
          "on_checkpoint_save", "on_checkpoint_load", "on_exception", "on_fit_end")


@dataclass
class StepOutput:
    """What one step produced: its mean loss (a detached tensor or a float), the samples it used, the lr it used
    (the first parameter group's; `group_lrs`: each group's by name or index, when they differ)."""

    loss: Any
    samples: int
    lr: float
    group_lrs: dict[str, float] | None = None


@dataclass
class RunState:
    """Where the run is. Checkpointed (with the callbacks' own state) and restored on resume."""

    step: int = 0  # updates applied (under --strategy async: gradients applied)
    position: Position = field(default_factory=Position)  # where the next batch comes from
    samples_seen: int = 0
    elapsed_seconds: float = 0.0  # wall time of finished sessions of this run
    last_train_loss: float = math.nan
    last_eval: dict[str, float] = field(default_factory=dict)
    health: dict[str, Any] | None = None  # the latest gradient-health verdict
    resumed_from: int | None = None
    rollbacks: int = 0
    end: int = 0  # the step this `fit` call stops at
    should_stop: bool = False  # set by a callback (early stopping) to end the run after this step
    finished: bool = False  # resumed at its end (last step or stopped early): the fit only completes the outputs

    def progress(self, elapsed_seconds: float) -> dict[str, Any]:
        """The checkpoint's record of how far the run got (`elapsed_seconds`: its wall time so far)."""
        return {"elapsed_seconds": elapsed_seconds, "samples_seen": self.samples_seen,
                "last_train_loss": self.last_train_loss}

    def load_progress(self, progress: dict[str, Any]) -> None:
        self.elapsed_seconds = float(progress.get("elapsed_seconds", 0.0))
        self.samples_seen = int(progress.get("samples_seen", 0))
        self.last_train_loss = float(progress.get("last_train_loss", math.nan))


class Callback:
    """Override any of the events listed in this module's docstring; the default does nothing. Override
    `state_dict` / `load_state_dict` to keep state in checkpoints (exact resume)."""

    state_key: str | None = None  # its key in payload["callbacks"] (default: the class name)

    def state_dict(self, trainer) -> Any:
        """What this callback keeps in a checkpoint (torch-saveable: tensors, numbers, strings, containers)."""
        return None

    def load_state_dict(self, trainer, state: Any) -> None:
        """Restore from `state` (what `state_dict` returned when the checkpoint was written; None if nothing)."""

    def on_fit_start(self, trainer) -> None: ...
    def on_step_start(self, trainer) -> None: ...
    def on_step_end(self, trainer, out: StepOutput) -> None: ...
    def on_train_end(self, trainer) -> None: ...
    def on_evaluate(self, trainer, results: dict[str, float]) -> None: ...
    def on_log(self, trainer, record: dict[str, Any]) -> None: ...
    def on_message(self, trainer, text: str) -> None: ...
    def on_checkpoint_save(self, trainer, payload: dict[str, Any]) -> None: ...
    def on_checkpoint_load(self, trainer, payload: dict[str, Any]) -> None: ...
    def on_exception(self, trainer, error: BaseException) -> None: ...
    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None: ...


class CallbackList:
    """Fires an event on every callback that overrides it, in order (no call at all for the rest)."""

    def __init__(self, callbacks: list[Callback]):
        for i, cb in enumerate(callbacks):
            if not isinstance(cb, Callback):
                check_type(f"callbacks[{i}]", cb, Callback, "a gradwise.Callback (callbacks must subclass it)",
                           optional=False)
        self.callbacks = list(callbacks)
        self._by_event = {event: [getattr(cb, event) for cb in self.callbacks
                                  if getattr(type(cb), event) is not getattr(Callback, event)] for event in EVENTS}

    def fire(self, event: str, trainer, *args) -> None:
        for handler in self._by_event[event]:
            handler(trainer, *args)

    def _stateful(self) -> list[tuple[str, Callback]]:
        """(key, callback) for every callback that keeps state; keys unique (a repeated name is numbered)."""
        keyed, seen = [], {}
        for cb in self.callbacks:
            if type(cb).state_dict is Callback.state_dict and type(cb).load_state_dict is Callback.load_state_dict:
                continue
            name = cb.state_key or type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            keyed.append((name if seen[name] == 1 else f"{name}#{seen[name]}", cb))
        return keyed

    def state_dicts(self, trainer) -> dict[str, Any]:
        """Every stateful callback's state, by key: `payload["callbacks"]`."""
        return {key: cb.state_dict(trainer) for key, cb in self._stateful()}

    def load_state_dicts(self, trainer, states: dict[str, Any]) -> None:
        for key, cb in self._stateful():
            cb.load_state_dict(trainer, states.get(key))

    def find(self, kind: type) -> Any:
        """The first callback of class `kind`, or None."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

