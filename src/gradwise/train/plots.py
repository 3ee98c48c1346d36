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
    scaler = [r for r in records if r.get("kind") == "scaler"]
    if scaler or any("loss_scale" in r for r in records):
        written.append(_plot_loss_scale(records, scaler, folder, plt))
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


def _plot_loss_scale(records: list[dict[str, Any]], events: list[dict[str, Any]], folder: Path, plt) -> Path:
    """loss_scale.png: the fp16 loss scale over steps (a step line), overflow steps marked."""
    points = sorted([(r["step"], r["loss_scale"]) for r in records if "loss_scale" in r and r.get("kind") == "train"]
                    + [(e["step"], e["scale"]) for e in events])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if points:
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", label="loss scale")
    overflows = [e for e in events if e["event"] == "overflow"]
    if overflows:
        ax.plot([e["step"] for e in overflows], [e["scale"] for e in overflows], "rv", markersize=5,
                label=f"overflow: step skipped ({len(overflows)})")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = folder / "loss_scale.png"
    write_with(path, lambda handle: fig.savefig(handle, format="png"))
    plt.close(fig)
    return path
