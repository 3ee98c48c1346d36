"""The run directory: what marks a folder as holding a run, and the config a resumed run may change."""

from __future__ import annotations

from pathlib import Path

from gradwise.config import Config, apply_overrides, read_yaml, validate
from gradwise.errors import CheckpointError, ConfigError
from gradwise.io import write_text

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
# Keys a resumed run may change: they alter how long it runs and what it reports, never its trajectory.
RESUMABLE_KEYS = ("train.steps", "train.epochs", "train.eval_every", "train.eval_batch_size",
                  "train.checkpoint_every", "log.", "loader.")


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


def describe_run(model, data, size: int | None, builtin: bool) -> str:
    """One line on what is trained: the model's class and size, the data's class and length."""
    return (f"model: {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters); data: "
            f"{type(data).__name__} ({size or 'streaming'} samples)"
            f"{'' if builtin else '; the data and model sections below describe built-ins, unused'}")


def prepare_run_dir(out_dir: Path, cfg: Config, fresh: bool, about: str = "") -> None:
    """Create `out_dir` and write the resolved config.yaml (`about`, a line on the model and data trained, as a
    comment at its top); a fresh run refuses a folder that holds one."""
    if fresh and holds_run(out_dir):
        raise CheckpointError(f"checkpoint error: '{out_dir}' already holds a run; pass --resume "
                              f"{out_dir} to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "config.yaml", (f"# {about}\n" if about else "") + cfg.to_yaml())


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config of the run in `run_dir` with `overrides` applied (only keys that keep its trajectory)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint error: '{run_dir}' is not a run directory (no config.yaml)")
    overrides = list(overrides or [])
    for text in overrides:
        key = text.partition("=")[0]
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            raise ConfigError(
                f"config error: '{key}' cannot change on --resume (allowed: {', '.join(RESUMABLE_KEYS)}*)"
            )
    raw = read_yaml(run_dir / "config.yaml")
    keys = {text.partition("=")[0] for text in overrides}
    if "train.steps" in keys:
        raw.setdefault("train", {})["epochs"] = None
    if "train.epochs" in keys:
        raw.setdefault("train", {})["steps"] = None
    return validate(apply_overrides(raw, overrides))
