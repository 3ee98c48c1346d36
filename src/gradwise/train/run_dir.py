"""The run directory: what marks a folder as holding a run, and the config a resumed run may change."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

import yaml

from gradwise.arguments import check_overrides, check_path
from gradwise.config import Config, apply_overrides, flatten, read_yaml, validate
from gradwise.checkpoint.sharded import remove_other_folders
from gradwise.errors import CheckpointError, ConfigError
from gradwise.io import write_text

LOCK = ".gradwise.lock"
# Keys a resumed run may change: they alter how long it runs, what it reports and how it computes (train.compile,
# ps.worker_threads: the same arithmetic up to floating-point rounding), never the trajectory itself.
RESUMABLE_KEYS = ("train.steps", "train.epochs", "train.eval_every", "train.eval_batch_size",
                  "train.checkpoint_every", "train.strategy", "train.shard_modules", "train.compile",
                  "train.compile_mode", "train.compile_backend", "ps.worker_threads", "log.", "loader.")


def allowed_on_resume() -> str:
    return ", ".join(f"{k}*" if k.endswith(".") else k for k in RESUMABLE_KEYS)


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


RENAMED = {("train", "parallel"): "strategy"}  # keys earlier versions wrote into config.yaml and checkpoints


def upgraded(raw: dict) -> dict:
    """A config tree an earlier gradwise wrote, with its renamed keys under their current names."""
    for (section, old), new in RENAMED.items():
        part = raw.get(section)
        if isinstance(part, dict) and old in part:
            part[new] = part.pop(old)
    return raw


def check_same_trajectory(saved: dict, current: dict, where: str) -> None:
    """Refuse a config that differs from the checkpoint's in a key that would change the run's trajectory
    (config.yaml edited by hand, or a script passing another config), as an override on --resume is refused."""
    before, now = flatten(upgraded(saved)), flatten(current)
    # a key added to gradwise since the checkpoint was written holds its default there
    before = {**{k: v for k, v in flatten(Config().to_dict()).items() if k not in before}, **before}
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and not _resumable(k))
    if changed:
        key = changed[0]
        raise ConfigError(f"config error: '{key}' is {now.get(key)!r} now but {before.get(key)!r} in the checkpoint "
                          f"'{where}'{f' (and {len(changed) - 1} more keys)' if len(changed) > 1 else ''}; it cannot "
                          f"change on resume (allowed: {allowed_on_resume()})")


MARK = "# gradwise run: "  # config.yaml's first line: what tells gradwise's own attempt from a user's file


def written_by_gradwise(config: Path) -> bool:
    try:
        with open(config, errors="replace") as f:
            return f.readline().startswith(MARK)
    except OSError:  # a folder, or unreadable: not a config.yaml gradwise wrote
        return False


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds a run worth keeping: one that reached a checkpoint or finished. An attempt
    that crashed before its first checkpoint (config.yaml, metrics) holds nothing a resume could use."""
    return folder.is_dir() and ((folder / "checkpoints" / "last.pt").is_file() or (folder / "summary.json").is_file())


def refuse_existing_run(folder: Path) -> None:
    """A new run must not start in a folder that holds one (CheckpointError naming how to continue it)."""
    if holds_run(folder):
        raise CheckpointError(f"checkpoint error: '{folder}' already holds a run; pass --resume {folder} "
                              "to continue it or choose another --out")


def clear_attempt(folder: Path) -> None:
    """Remove what an attempt that never reached a checkpoint wrote (only gradwise's own file names; the caller
    has checked that config.yaml is gradwise's), so a new one starts clean."""
    if not (folder / "config.yaml").is_file():
        return
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "updates.jsonl"):  # updates: the async server's
        (folder / name).unlink(missing_ok=True)
    for pattern in ("tensorboard/events.out.tfevents.*", "plots/*.png"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
    remove_other_folders(folder / "checkpoints", keep="")  # shards a first sharded save left unfinished


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of writes a killed process left (gradwise.io names them `.NAME.*.tmp`)."""
    for sub in (folder, folder / "checkpoints"):
        if sub.is_dir():
            for tmp in sub.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An advisory lock (`fcntl.flock`) on RUN_DIR/.gradwise.lock, held by the one process that trains into
    the folder; the kernel releases it when that process ends, however it ends."""

    def __init__(self, folder: Path):
        self.folder, self.fd = Path(folder), None
        self.made: list[Path] = []

    def acquire(self, mark: bool = True) -> "RunLock":
        """Take the lock (an error naming the holder if another process has it); `mark`: write our PID in it."""
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"checkpoint error: the run directory '{self.folder}' is a file, not a folder")
        self.made = [] if self.folder.exists() else [self.folder]  # what `release(undo=True)` removes again
        self.made += [] if (self.folder / LOCK).exists() else [self.folder / LOCK]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CheckpointError(f"checkpoint error: cannot use '{self.folder}' as a run directory "
                                  f"({err.strerror or type(err).__name__})") from None
        for attempt in range(40):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                if attempt < 39 and not _alive(holder):  # its forked loader workers may hold it a few seconds more
                    time.sleep(0.25)
                    continue
                os.close(fd)
                raise CheckpointError(f"checkpoint error: '{self.folder}' is in use by process {holder}, which is "
                                      "training into it; wait for it to end or stop it") from None
        if mark:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self, undo: bool = False) -> None:
        """Unlock, then close. The unlock matters: loader workers forked while the lock was held share its
        open file, and the lock lasts until every holder of that file closes it, unless it is unlocked.
        `undo`: the run was refused; the lock file (and the folder, if still empty) this lock made are removed."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            for path in reversed(self.made if undo else []):
                with contextlib.suppress(OSError):
                    path.unlink() if path.name == LOCK else path.rmdir()

    def check_free(self) -> None:
        """Raise the same error as `acquire` if another process holds the lock (for a launcher, before it starts
        the processes that will take it)."""
        self.acquire(mark=False).release(undo=True)


def describe_run(model, data, size: int | None, configured: bool) -> tuple[str, dict[str, dict] | None]:
    """What is trained: one line (the model's class and size, the data's class and length) and, for a model
    and data handed to a Trainer (not named by the config: `configured` False), the `data` and `model` sections
    config.yaml records instead of the built-ins'."""
    params = sum(p.numel() for p in model.parameters())
    line = f"model: {type(model).__name__} ({params} parameters); data: {type(data).__name__} " \
           f"({size or 'streaming'} samples)"
    sections = None if configured else {
        "data": {"name": "user", "class": type(data).__name__, "samples": size if size else "streaming"},
        "model": {"name": "user", "class": type(model).__name__, "parameters": params}}
    return line, sections


def check_run_dir(out_dir: Path, fresh: bool) -> None:
    """Refuse a run folder before anything is written into it (not even the lock): a file in its place, a run
    there when this one is `fresh`, or a config.yaml or metrics.jsonl that no gradwise run wrote."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"checkpoint error: the run directory '{out_dir}' is a file, not a folder")
    if fresh:
        refuse_existing_run(out_dir)
    foreign = [name for name in ("config.yaml", "metrics.jsonl") if (out_dir / name).exists()]
    ours = (out_dir / "config.yaml").is_file() and written_by_gradwise(out_dir / "config.yaml")
    if foreign and not ours:
        raise CheckpointError(f"checkpoint error: '{out_dir}' has a {foreign[0]} that no gradwise run wrote; "
                              "choose another --out (gradwise never replaces files it did not write)")


def prepare_run_dir(out_dir: Path, cfg: Config, fresh: bool, about: tuple[str, dict | None] = ("", None)) -> None:
    """Make `out_dir` ready and write the resolved config.yaml (`about`, from `describe_run`: a line on what is
    trained, as a comment at its top, and the user's data and model sections). A fresh run refuses a folder
    that holds a run and replaces an attempt that crashed before its first checkpoint."""
    check_run_dir(out_dir, fresh)
    remove_stale_temp_files(out_dir)
    if fresh:
        clear_attempt(out_dir)
    line, sections = about
    text = cfg.to_yaml() if sections is None else yaml.safe_dump({**cfg.to_dict(), **sections}, sort_keys=False)
    write_text(out_dir / "config.yaml", f"{MARK}{line}\n" + text)


def checkpoint_path(run_dir: Path) -> Path:
    """RUN_DIR/checkpoints/last.pt, which may not exist yet; anything but a file in its place is an error (a resume
    must not take a damaged run for one that has no checkpoint yet and start it over)."""
    path = run_dir / "checkpoints" / "last.pt"
    if path.parent.exists() and not path.parent.is_dir() or path.exists() and not path.is_file():
        raise CheckpointError(f"checkpoint error: '{path}' is not a checkpoint file (it or its folder is something "
                              "else); restore it, or train a new run elsewhere")
    return path


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config of the run in `run_dir` with `overrides` applied (only keys that keep its trajectory)."""
    check_path("run_dir", run_dir, optional=False)
    check_overrides("overrides", overrides)
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint error: '{run_dir}' is not a run directory (no config.yaml)")
    checkpoint_path(run_dir)
    overrides = list(overrides or [])
    for text in overrides:
        key = text.partition("=")[0]
        if not _resumable(key):
            raise ConfigError(
                f"config error: '{key}' cannot change on --resume (allowed: {allowed_on_resume()})"
            )
    raw = upgraded(read_yaml(run_dir / "config.yaml"))
    if not all(isinstance(raw.get(section, {}), dict) for section in ("model", "train")):
        return validate(raw)  # config.yaml edited to `model: 5`: the one-line error naming the key
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
