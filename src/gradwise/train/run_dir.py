"""The run directory: what marks a folder as holding a run, and the config a resumed run may change."""

from __future__ import annotations

from pathlib import Path

import yaml

from gradwise.config import Config, apply_overrides, read_yaml, validate
from gradwise.errors import CheckpointError, ConfigError
from gradwise.io import write_text

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
# Keys a resumed run may change: they alter how long it runs and what it reports, never its trajectory.
RESUMABLE_KEYS = ("train.steps", "train.epochs", "train.eval_every", "train.eval_batch_size",
                  "train.checkpoint_every", "log.", "loader.")


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


def describe_run(model, data, size: int | None, builtin: bool) -> tuple[str, dict[str, dict] | None]:
    """What is trained: one line (the model's class and size, the data's class and length) and, for a model
    and data of the user's own, the `data` and `model` sections config.yaml records instead of the built-ins'."""
    params = sum(p.numel() for p in model.parameters())
    line = f"model: {type(model).__name__} ({params} parameters); data: {type(data).__name__} " \
           f"({size or 'streaming'} samples)"
    sections = None if builtin else {
        "data": {"name": "user", "class": type(data).__name__, "samples": size if size else "streaming"},
        "model": {"name": "user", "class": type(model).__name__, "parameters": params}}
    return line, sections


def prepare_run_dir(out_dir: Path, cfg: Config, fresh: bool, about: tuple[str, dict | None] = ("", None)) -> None:
    """Create `out_dir` and write the resolved config.yaml (`about`, from `describe_run`: a line on what is
    trained, as a comment at its top, and the user's data and model sections); a fresh run refuses a folder
    that holds one."""
    if fresh and holds_run(out_dir):
        raise CheckpointError(f"checkpoint error: '{out_dir}' already holds a run; pass --resume "
                              f"{out_dir} to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    line, sections = about
    text = cfg.to_yaml() if sections is None else yaml.safe_dump({**cfg.to_dict(), **sections}, sort_keys=False)
    write_text(out_dir / "config.yaml", (f"# {line}\n" if line else "") + text)


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
    if (raw.get("model") or {}).get("name") == "user":
        raise CheckpointError(f"checkpoint error: '{run_dir}' trained a model of your own "
                              f"({raw['model'].get('class')}); continue it from Python with "
                              "Trainer(model, data, config=..., out_dir=...).fit(resume=True)")
    keys = {text.partition("=")[0] for text in overrides}
    if "train.steps" in keys:
        raw.setdefault("train", {})["epochs"] = None
    if "train.epochs" in keys:
        raw.setdefault("train", {})["steps"] = None
    return validate(apply_overrides(raw, overrides))
