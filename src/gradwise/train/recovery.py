"""Continuing a run from its checkpoint: a resume (whatever moment the last session ended at) and, on a
non-finite step, stopping with the layer's name or rolling back to the last checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

from gradwise.diagnostics.health import REMEDIES
from gradwise.errors import CheckpointError, ConfigError, NonFiniteError
from gradwise.train.callbacks import EarlyStop
from gradwise.train.run_dir import check_same_trajectory, checkpoint_path
from gradwise.checkpoint.format import load_checkpoint
from gradwise.train.step import NonFiniteStep


def resume_from(trainer, run_dir: str | Path, finished_ok: bool = False) -> bool:
    """Load `run_dir`'s checkpoints/last.pt into `trainer`, from whatever moment the last session ended at:

    - no checkpoint yet (it crashed before the first): nothing to load, the run starts again from step 0;
    - mid-run: the weights, optimizer, schedule, data position, RNG and callbacks' state (its config must
      match the checkpoint's, but for the keys a resume may change);
    - at the end (the last step, or stopped early) but before summary.json: the fit completes the outputs;
    - finished (summary.json written): an error, with how to train further; with `finished_ok` (a script
      run again, a restarted group) True is returned instead and nothing is loaded: the run is complete.
    """
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir)
    if not path.is_file():
        if (run_dir / "summary.json").is_file():
            raise CheckpointError(f"checkpoint error: the run in '{run_dir}' finished, but has no checkpoint to "
                                  "resume from (checkpoints/last.pt is missing)")
        if trainer.is_main:
            print(f"gradwise: '{run_dir}' has no checkpoint yet; starting the run from step 0", file=sys.stderr)
        return False
    payload = load_checkpoint(path)
    check_same_trajectory(payload["config"], trainer.cfg.to_dict(), str(path))
    trainer.load_state_dict(payload, where=str(path))
    state = trainer.state
    early_stop = trainer.callbacks.find(EarlyStop)  # a run early stopping ended is over
    stopped_at = early_stop.tracker.stopped_at if early_stop is not None else None
    state.finished = stopped_at is not None or state.step >= trainer.total_steps
    if state.finished and (run_dir / "summary.json").is_file():
        if finished_ok:
            return True
        raise ConfigError(
            f"config error: the run in '{run_dir}' stopped early at step {stopped_at} (early stopping, "
            f"early_stopping.patience={trainer.cfg.early_stopping.patience}); there is nothing to resume"
            if stopped_at is not None else
            f"config error: the run in '{run_dir}' is finished (step {state.step} of {trainer.total_steps}); "
            f"pass train.steps=M with M > {state.step} to train further")
    return False


def reload_after_failure(trainer) -> None:
    """Ready a trainer whose fit raised (its state stopped mid-step) to be resumed from its last checkpoint,
    metrics records included. Without a checkpoint its model trained in memory until the failure, so starting
    again from step 0 with it would not be the run: refused."""
    if not (trainer.out_dir / "checkpoints" / "last.pt").is_file():
        raise CheckpointError(f"checkpoint error: '{trainer.out_dir}' has no checkpoint to continue from and this "
                              "trainer's model trained until the failure; build a new Trainer (and model) to start "
                              "the run again")
    trainer.records, trainer.interrupted = [], False


def recover(trainer, event: NonFiniteStep) -> None:
    """Raise NonFiniteError (`diagnostics.on_nonfinite=stop`), or reload checkpoints/last.pt with a lower lr."""
    d, state = trainer.cfg.diagnostics, trainer.state
    if d.on_nonfinite == "stop":
        raise NonFiniteError(
            f"{event}; the step was not applied. Set diagnostics.on_nonfinite=rollback to retry "
            f"from the last checkpoint with a lower lr, or: {REMEDIES['exploding']}"
        ) from None
    path = trainer.out_dir / "checkpoints" / "last.pt" if trainer.out_dir is not None else None
    if state.rollbacks >= d.max_rollbacks or path is None or not path.is_file():
        why = (f"{state.rollbacks} rollbacks already (diagnostics.max_rollbacks={d.max_rollbacks})"
               if state.rollbacks >= d.max_rollbacks else "no checkpoint to roll back to yet")
        raise NonFiniteError(f"{event}; {why}") from None
    resumed_from, rollbacks, wall = state.resumed_from, state.rollbacks, trainer.wall_seconds()
    trainer.load_state_dict(load_checkpoint(path), where=str(path))
    state.resumed_from, state.rollbacks, state.elapsed_seconds = resumed_from, rollbacks + 1, wall  # time goes on
    trainer.engine.scale_lr(d.rollback_lr_factor)
    trainer.log({"kind": "rollback", "step": event.step, "layer": event.where,
                 "to_step": state.step, "lr_factor": d.rollback_lr_factor})
    trainer.message(f"{event}; rolled back to step {state.step}, lr x{d.rollback_lr_factor}")
