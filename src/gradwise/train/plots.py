"""PNG plots of a run's metrics (loss, and accuracy or bits-per-char), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradwise.io import write_with


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(records: list[dict[str, Any]], folder: str | Path) -> list[Path]:
    """Draw loss.png and accuracy.png (or bpc.png) from metrics records; returns the paths written."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = []
    panels = [("loss.png", "loss", ["train_loss", "test_loss"])]
    for key, name in (("test_accuracy", "accuracy.png"), ("test_bpc", "bpc.png")):
        if any(key in r for r in records):
            panels.append((name, key.removeprefix("test_"), [key]))
    for filename, ylabel, keys in panels:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if key.startswith("test") else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ylabel == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / filename
        write_with(path, lambda handle: fig.savefig(handle, format="png"))
        plt.close(fig)
        written.append(path)
    return written
