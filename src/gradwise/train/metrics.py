"""Run output helpers: reading `metrics.jsonl`, the TensorBoard writer, and terminal progress.

The callbacks that write them are in gradwise.train.callbacks.records. `Progress`
draws a tqdm bar on a terminal and prints plain lines otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from gradwise.errors import ConfigError
from gradwise.io import read_jsonl


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl (a torn last line is skipped; other damage: one-line error)."""
    path = Path(path)
    return read_jsonl(path) if path.exists() else []


def tensorboard_writer(folder: str | Path):
    """A SummaryWriter (the `tensorboard` extra), or a one-line config error naming the fix."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("config error: log.tensorboard=true needs TensorBoard: pip install 'gradwise[tensorboard]'") \
            from None
    return SummaryWriter(log_dir=str(folder))


def _fmt(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if key in ("step", "kind", "time"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


class Progress:
    """A tqdm bar (terminal) or plain periodic lines (pipes, CI); mode from `log.progress`."""

    def __init__(self, mode: str, total: int, initial: int = 0, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode, self.total = mode, total
        self._bar = None
        self._postfix: dict[str, str] = {}
        if mode == "bar":
            self._bar = tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def show(self, record: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        if self._bar is not None:
            for key in ("train_loss", "lr", "test_accuracy", "test_bpc"):
                if key in record:
                    self._postfix[key] = f"{record[key]:.4g}"
            self._bar.set_postfix(self._postfix, refresh=False)
            if record.get("kind") == "eval":
                self._bar.write(f"eval step {record['step']}/{self.total}: {_fmt(record)}", file=self.stream)
            return
        label = "eval" if record.get("kind") == "eval" else "step"
        print(f"{label} {record['step']}/{self.total}: {_fmt(record)}", file=sys.stdout, flush=True)

    def message(self, text: str) -> None:
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
