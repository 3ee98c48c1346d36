"""What the loop does with a non-finite step: stop naming the layer, or roll back to the last checkpoint."""

from __future__ import annotations

from gradwise.diagnostics.health import REMEDIES
from gradwise.errors import NonFiniteError
from gradwise.train.state import load_checkpoint
from gradwise.train.step import NonFiniteStep


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
