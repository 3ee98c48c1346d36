"""`gradwise report` / `gradwise compare` HTML pages and TensorBoard logging (issue 10)."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from conftest import SMALL
from gradwise.cli import main

VOID = {"meta", "br", "img", "hr", "link", "input"}


class Structure(HTMLParser):
    """Checks that every non-void tag closes in order; counts tags and collects text."""

    def __init__(self):
        super().__init__()
        self.stack, self.counts, self.text, self.errors = [], {}, [], []
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> Structure:
    s = Structure()
    s.feed(path.read_text())
    s.close()
    assert s.doctype and not s.errors and not s.stack, (s.errors, s.stack)
    return s


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    common = [*SMALL, "train.steps=60", "log.every=10", "train.eval_every=20", "diagnostics.every=10",
              "data.val_fraction=0.2"]
    assert main(["train", "--out", str(base / "a"), *common, "optim.lr=0.01"]) == 0
    assert main(["train", "--out", str(base / "b"), *common, "optim.lr=0.003", "precision=fp16",
                 "scaler.init_scale=1e9"]) == 0
    return base / "a", base / "b"


def test_report_renders_a_real_run_as_valid_html_with_its_plots(two_runs, capsys):
    run = two_runs[1]
    assert main(["report", str(run)]) == 0
    page = parse(run / "report.html")
    text = " ".join(page.text)
    assert page.counts.get("svg", 0) >= 5  # loss, accuracy, lr, grad norm, loss scale
    for title in ("Loss", "Accuracy", "Learning rate", "Gradient norm", "Loss scale (fp16)"):
        assert f'aria-label="{title}"' in (run / "report.html").read_text()
    assert "Gradient health verdicts" in text and "healthy" in text  # the diagnostics records
    assert "overflow" in text  # loss-scale events of the fp16 run
    assert "params_sha256" in text and "test_accuracy" in text
    assert "<script" not in (run / "report.html").read_text()  # self-contained, nothing to fetch or run


def test_compare_overlays_runs_and_lists_config_differences(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert main(["compare", str(two_runs[0]), str(two_runs[1]), "--out", str(out)]) == 0
    page = parse(out)
    text = " ".join(page.text)
    assert page.counts.get("svg", 0) >= 4
    assert "a: train_loss" in text and "b: train_loss" in text  # both runs on one plot
    assert "optim.lr" in text and "precision" in text  # the config keys that differ
    assert "data.num_samples" not in text  # ... and only those


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2


def test_tensorboard_logging(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SMALL, "train.steps=20", "log.every=5", "train.eval_every=10",
                 "log.tensorboard=true"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/train_loss" in tags and "eval/test_accuracy" in tags
    assert [e.step for e in events.Scalars("train/train_loss")] == [5, 10, 15, 20]


def test_bench_writes_json_and_markdown_with_the_machine(tmp_path, capsys, monkeypatch):
    import json

    from gradwise.bench import matmul

    cnn = {job: o for job, o in matmul.JOBS.items() if "CNN" in job}  # the transformer's steps take seconds
    monkeypatch.setattr(matmul, "JOBS", cnn)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["bench", "matmul-limit", "--steps", "3", "--repeats", "1", "--json", str(out),
                 "--markdown", str(md)]) == 0
    results = json.loads(out.read_text())
    rows = results["benchmarks"]["matmul-limit"]["rows"]
    assert {r["precision"] for r in rows} == {"fp32", "bf16"}
    assert all(r["GFLOP/step"] > 0 and 0 < r["MFU"] for r in rows)
    assert all(r["model-shape GFLOP/s"] > 0 for r in rows)  # the model's own layer shapes, timed
    assert results["benchmarks"]["matmul-limit"]["memory_bandwidth_gbs"] > 0  # STREAM triad
    text = md.read_text()
    assert results["date"] in text and results["machine"]["cpu"] in text and "| job | precision |" in text


def test_bench_optimizers_reports_each_step_against_its_bandwidth_floor():
    from gradwise.bench.optimizers import FLOOR_BYTES, run

    result = run(steps=1, repeats=1)
    mine = {r["optimizer"]: r for r in result["rows"] if r["implementation"] == "gradwise"}
    assert set(mine) == set(FLOOR_BYTES) == {"AdamW", "LAMB", "LARS"}
    assert all(r["x bandwidth floor"] > 0 and r["ms/step"] > 0 for r in mine.values())
    adamw = {r["implementation"] for r in result["rows"] if r["optimizer"] == "AdamW"}
    assert adamw == {"gradwise", "torch (foreach)", "torch (fused)"}
