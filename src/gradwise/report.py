"""`gradwise report RUN_DIR` and `gradwise compare RUN_DIR...`: one self-contained HTML page per run or
comparison (plots inlined as SVG, no scripts, no server), opened by any browser.

A report shows the run's summary, its curves (loss, accuracy or bits/char, lr,
gradient norm, loss scale, staleness: whichever the run logged), the gradient
health verdicts and other events, and its config. A comparison overlays the
same curves for several runs and tabulates their summaries and the config keys
in which they differ.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from gradwise.config import flatten, read_yaml
from gradwise.errors import UserInputError
from gradwise.io import read_json
from gradwise.train.metrics import read_metrics

# (title, y label, [(record kind, key)], log scale)
PANELS = [
    ("Loss", "loss", [("train", "train_loss"), ("eval", "val_loss"), ("eval", "test_loss")], True),
    ("Accuracy", "accuracy", [("eval", "val_accuracy"), ("eval", "test_accuracy")], False),
    ("Bits per character", "bits/char", [("eval", "val_bpc"), ("eval", "test_bpc")], False),
    ("Learning rate", "lr", [("train", "lr")], False),
    ("Gradient norm", "global grad norm", [("train", "grad_norm")], True),
    ("Loss scale (fp16)", "scale", [("train", "loss_scale"), ("scaler", "scale")], True),
    ("Staleness (async)", "updates", [("train", "staleness_mean"), ("train", "staleness_max")], False),
    ("L1/L2 penalty", "penalty", [("train", "penalty")], True),
]
SUMMARY_KEYS = ["model_class", "data_class", "train_samples", "task", "final_train_loss", "test_loss", "test_accuracy",
                "test_bpc", "val_loss", "val_accuracy", "steps",
                "epochs", "wall_seconds", "samples_per_second", "skipped_steps", "loss_scale", "rollbacks",
                "world_size", "restarts", "updates", "staleness_mean", "staleness_max", "num_parameters",
                "params_sha256"]


def _plottable(value: Any) -> bool:
    """A number a plot can place: finite once a float (a damaged record's 400-digit integer is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and abs(float(value)) < 1e300
    except OverflowError:
        return False


class Run:
    """A run directory's config, summary and metrics records."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserInputError(f"usage error: '{folder}' is not a run directory")
        if not (self.folder / "metrics.jsonl").is_file():
            raise UserInputError(f"usage error: '{folder}' has no metrics.jsonl (is it a gradwise run directory?)")
        self.name = self.folder.name
        self.records = read_metrics(self.folder / "metrics.jsonl")
        summary = self.folder / "summary.json"
        self.summary: dict[str, Any] = read_json(summary) if summary.is_file() else {}
        self.config = read_yaml(self.folder / "config.yaml") if (self.folder / "config.yaml").is_file() else {}

    def series(self, kind: str, key: str) -> tuple[list[float], list[float]]:
        points = [(r["step"], r[key]) for r in self.records
                  if r.get("kind") == kind and "restored_from_step" not in r and _plottable(r.get("step"))
                  and _plottable(r.get(key))]
        return [p[0] for p in points], [p[1] for p in points]


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prologue and DOCTYPE: the SVG is inlined in HTML


def _figures(runs: list[Run]) -> list[tuple[str, str]]:
    """(title, inline SVG) for every panel some run has data for."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable, selectable
    import matplotlib.pyplot as plt

    figures = []
    for title, ylabel, series, log in PANELS:
        lines = []
        for i, run in enumerate(runs):
            for j, (kind, key) in enumerate(series):
                xs, ys = run.series(kind, key)
                if xs:
                    label = key if len(runs) == 1 else f"{run.name}: {key}"
                    lines.append((xs, ys, label, f"C{i if len(runs) > 1 else j}", ["-", "--", ":"][j % 3]))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for xs, ys, label, colour, style in lines:
            drawstyle = "steps-post" if "scale" in title.lower() else "default"
            ax.plot(xs, ys, style, color=colour, label=label, drawstyle=drawstyle,
                    marker="o" if len(xs) < 30 else None, markersize=3)
        if log and all(y > 0 for _, ys, *_ in lines for y in ys):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        figures.append((title, _svg(fig)))
        plt.close(fig)
    return figures


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _events(run: Run) -> str:
    health = [r for r in run.records if r.get("kind") == "health"]
    changes, last = [], None
    for r in health:  # one row per change of verdict (and the last record), not every check
        if r["verdict"] != last or r is health[-1]:
            changes.append([r["step"], r["verdict"], ", ".join(r.get("layers", [])[:5]), r.get("remedy") or ""])
            last = r["verdict"]
    parts = []
    if changes:
        parts.append("<h3>Gradient health verdicts</h3>" + _table(["step", "verdict", "layers", "remedy"], changes))
    other = [[r["step"], r["kind"], ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("kind", "step"))]
             for r in run.records if r.get("kind") in ("rollback", "scaler")]
    restored = [r for r in run.records if "restored_from_step" in r]
    other += [[r["step"], "early stopping", f"restored the weights of step {r['restored_from_step']}"]
              for r in restored]
    if other:
        parts.append("<h3>Events</h3>" + _table(["step", "event", "detail"], other[:200]))
    return "".join(parts) or "<p>No diagnostics records (diagnostics.every=0?).</p>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;
text-align:left}th{background:#f3f3f3}.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0}
pre{background:#f7f7f7;padding:1em;font-size:12px;overflow:auto}"""


HTML_MARK = '<meta name="generator" content="gradwise">'  # how `report`/`compare` know a page they may replace


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{HTML_MARK}"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>\n")


def _plots_html(figures: list[tuple[str, str]]) -> str:
    return "<div class=\"plots\">" + "".join(
        f"<figure aria-label=\"{html.escape(t)}\">{svg}</figure>" for t, svg in figures) + "</div>"


def render_report(folder: str | Path) -> str:
    run = Run(folder)
    summary_rows = [[k, run.summary[k]] for k in SUMMARY_KEYS if k in run.summary]
    health = run.summary.get("health") or {}
    body = [
        f"<h1>gradwise run: {html.escape(run.name)}</h1>",
        f"<p>{html.escape(str(run.folder.resolve()))}</p>",
        "<h2>Summary</h2>",
        _table(["key", "value"], summary_rows) if summary_rows else "<p>No summary.json (the run did not finish).</p>",
    ]
    if health:
        body.append(f"<p>Last gradient health verdict: <b>{html.escape(str(health.get('verdict')))}</b> at step "
                    f"{health.get('step')}</p>")
    if run.summary.get("early_stopping"):
        body.append("<p>Early stopping: " + html.escape(_fmt(run.summary["early_stopping"])) + "</p>")
    body += ["<h2>Curves</h2>", _plots_html(_figures([run])), "<h2>Diagnostics</h2>", _events(run),
             "<h2>Config</h2>", f"<pre>{html.escape(json.dumps(run.config, indent=2))}</pre>"]
    return _page(f"gradwise report: {run.name}", "".join(body))


def render_compare(folders: list[str | Path]) -> str:
    runs = [Run(f) for f in folders]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same folder names in different places: use the paths
        for r in runs:
            r.name = str(r.folder)
    keys = [k for k in SUMMARY_KEYS if any(k in r.summary for r in runs)]
    summary_rows = [[k, *[r.summary.get(k, "") for r in runs]] for k in keys]
    configs = [flatten(r.config) for r in runs]
    differing = sorted(k for k in set().union(*configs) if len({json.dumps(c.get(k)) for c in configs}) > 1)
    config_rows = [[k, *[c.get(k, "") for c in configs]] for k in differing]
    body = [
        f"<h1>gradwise comparison of {len(runs)} runs</h1>",
        "<h2>Summaries</h2>", _table(["key", *[r.name for r in runs]], summary_rows),
        "<h2>Curves</h2>", _plots_html(_figures(runs)),
        "<h2>Config keys that differ</h2>",
        _table(["key", *[r.name for r in runs]], config_rows) if config_rows else "<p>The configs are identical.</p>",
    ]
    return _page("gradwise comparison", "".join(body))
