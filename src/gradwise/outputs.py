"""Where a command may write a file: never over a run's own files, never over a file gradwise did not write.

`check_output(path, flag, ours)` is called by every command that writes a file the user names (`report`,
`compare`, `export`, `plan --json`, `bench --json/--markdown`) before it computes anything. It refuses, in one
line, a folder in the file's place, a file of a run (config.yaml, summary.json, metrics.jsonl, updates.jsonl,
the lock, anything under checkpoints/, plots/ or tensorboard/), and an existing file that `ours(path)` does not
recognise as one this command wrote before (which it may replace, as a re-run would).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from gradwise.errors import UserInputError
from gradwise.report import HTML_MARK
from gradwise.train.run_dir import LOCK, written_by_gradwise

RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "updates.jsonl", LOCK)
RUN_FOLDERS = ("checkpoints", "plots", "tensorboard")


def _is_run(folder: Path) -> bool:
    config = folder / "config.yaml"
    return config.is_file() and written_by_gradwise(config)


def check_output(path: str | Path, flag: str, ours: Callable[[Path], bool]) -> Path:
    """`path` as a Path, if the command may write it (see the module docstring); else UserInputError."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"usage error: {flag}={path} is a folder; name a file")
    where = path.resolve()
    if where.name in RUN_FILES and _is_run(where.parent) or where.parent.name in RUN_FOLDERS and \
            _is_run(where.parent.parent):
        raise UserInputError(f"usage error: {flag}={path} is a file of the run in '{where.parent}' (writing it would "
                             "damage the run); choose another file")
    if path.exists() and not ours(path):
        raise UserInputError(f"usage error: {flag}={path} exists and is not a file this command wrote; gradwise "
                             "never replaces files it did not write: remove it or choose another file")
    return path


def head(path: Path, size: int = 4096) -> str:
    """The first `size` bytes of a file as text ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.read(size).decode("utf-8", errors="replace")
    except OSError:
        return ""


def html_page(path: Path) -> bool:
    return HTML_MARK in head(path)


def json_with(*keys: str) -> Callable[[Path], bool]:
    """Recognises a JSON object holding every one of `keys` (what a command writes)."""
    def ours(path: Path) -> bool:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(value, dict) and all(k in value for k in keys)

    return ours
