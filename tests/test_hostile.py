"""Hostile and careless input, case by case: each ends in exit 2 and one line (or as documented), and every file
that existed before is byte-identical after, with nothing new left behind.

The table holds the cases of issue 30 by category: commands that could destroy a user's files, refusals that
could leave files behind, files in other encodings or damaged, values the schema must refuse, YAML bombs, data
files of the wrong kind. tests/test_fuzz.py generates cases at random against the same contract.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import SMALL
from hostile import check_refusal, copy_run, make_run, run_cli, snapshot


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("hostile") / "run")


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


BOMB = textwrap.dedent("""\
    a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    optim: {exclude: *i}
    """)


HUGE_HISTOGRAM = '{"staleness_histogram": {"1": 1e400}}'


def _npy(path: Path) -> Path:
    with open(path, "wb") as f:
        np.save(f, np.ones((4, 4)))
    return path


def _edit_config(run: Path, change) -> None:
    raw = yaml.safe_load((run / "config.yaml").read_text())
    change(raw)
    (run / "config.yaml").write_text("# gradwise run: edited\n" + yaml.safe_dump(raw))


def _folder_for_checkpoint(run: Path) -> None:
    (run / "checkpoints" / "last.pt").unlink()
    (run / "checkpoints" / "last.pt").mkdir()
    (run / "summary.json").unlink()


# (id, setup(workspace, run) -> argv, expected status, fragment of the one line). The workspace holds a copy of a
# finished run at workspace/run; setup may add files to it before the snapshot is taken.
CASES = [
    # commands that would destroy a user's files
    ("export over the checkpoint", lambda ws, run: ["export", str(run), "--out", str(run / "checkpoints/last.pt")],
     2, "file of the run"),
    ("report over config.yaml", lambda ws, run: ["report", str(run), "--out", str(run / "config.yaml")],
     2, "file of the run"),
    ("compare over summary.json", lambda ws, run: ["compare", str(run), str(run), "--out", str(run / "summary.json")],
     2, "file of the run"),
    ("export over a user's file", lambda ws, run: ["export", str(run), "--out", str(_write(ws / "mine.pt", b"x"))],
     2, "did not write"),
    ("report over a user's page", lambda ws, run: ["report", str(run), "--out", str(_write(ws / "a.html", "<p>"))],
     2, "did not write"),
    ("report into a folder", lambda ws, run: ["report", str(run), "--out", str(ws)], 2, "is a folder"),
    ("resume --print-config prints only", lambda ws, run: ["train", "--resume", str(run), "--print-config",
                                                            "train.steps=8"], 0, None),
    ("resume with last.pt a folder", lambda ws, run: [_folder_for_checkpoint(run), "train", "--resume", str(run)][1:],
     2, "not a checkpoint file"),
    # refusals that must leave nothing behind
    ("simulate with a missing delay file", lambda ws, run: ["train", *SMALL, "--strategy", "simulate",
                                                             "ps.delay=/nonexistent.jsonl", "--out", str(ws / "new")],
     2, "ps.delay"),
    ("a folder holding a user's config.yaml", lambda ws, run: [
        (ws / "their_dir").mkdir(), _write(ws / "their_dir" / "config.yaml", "lr: 1\n"),
        "train", *SMALL, "--out", str(ws / "their_dir")][2:], 2, "no gradwise run wrote"),
    ("--out names a file", lambda ws, run: ["train", *SMALL, "--out", str(_write(ws / "f.txt", "x"))],
     2, "is a file"),
    # files in other encodings or damaged
    ("a UTF-16 config", lambda ws, run: ["train", "--config", str(_write(ws / "c.yaml", "seed: 1\n".encode("utf-16"))),
                                         "--print-config"], 2, "not UTF-8"),
    ("a latin-1 config with an accented comment",
     lambda ws, run: ["train", "--config", str(_write(ws / "c.yaml", "# réglage\nseed: 1\n".encode("latin-1"))),
                      "--print-config"], 2, "not UTF-8"),
    ("a binary config", lambda ws, run: ["train", "--config", str(_write(ws / "c.yaml", bytes(range(256)))),
                                         "--print-config"], 2, "c.yaml"),
    ("a binary config.yaml on resume", lambda ws, run: [_write(run / "config.yaml", b"\xff\xfe\x00\x81"),
                                                        "train", "--resume", str(run)][1:], 2, "config.yaml"),
    ("a binary metrics.jsonl for report", lambda ws, run: [_write(run / "metrics.jsonl", b"\x80\x81\n{}"),
                                                           "report", str(run), "--out", str(ws / "r.html")][1:],
     2, "metrics.jsonl"),
    ("a damaged metrics.jsonl for report", lambda ws, run: [_write(run / "metrics.jsonl", '{"a": 1}\n[1\n{"b": 2}'),
                                                            "report", str(run), "--out", str(ws / "r.html")][1:],
     2, "line 2"),
    ("a damaged summary.json for compare", lambda ws, run: [_write(run / "summary.json", "{not json"),
                                                            "compare", str(run), str(run), "--out",
                                                            str(ws / "c.html")][1:], 2, "summary.json"),
    ("a summary.json holding a list", lambda ws, run: [_write(run / "summary.json", "[1, 2]"),
                                                       "report", str(run), "--out", str(ws / "r.html")][1:],
     2, "not a JSON object"),
    ("config.yaml edited to model: 5", lambda ws, run: [_edit_config(run, lambda raw: raw.update(model=5)),
                                                        "train", "--resume", str(run), "train.steps=8"][1:],
     2, "model"),
    ("config.yaml edited to train: 5", lambda ws, run: [_edit_config(run, lambda raw: raw.update(train=5)),
                                                        "train", "--resume", str(run), "train.steps=8"][1:],
     2, "train"),
    # values the schema must refuse
    *[(f"override {o}", (lambda o: lambda ws, run: ["train", *SMALL, *o.split(), "--out", str(ws / "new")])(o),
       2, key)
      for o, key in [("optim.betas=[0.9,1.0]", "optim.betas"), ("optim.betas=[2,3]", "optim.betas"),
                     ("optim.betas=[-0.5,0.9]", "optim.betas"), (f"seed={2**64}", "seed"),
                     ("data.generator_seed=-1", "data.generator_seed"),
                     (f"data.generator_seed={2**64}", "data.generator_seed"),
                     ("model.channels=[-1,8]", "model.channels"), ("model.kernel_sizes=[-3,3]", "model.kernel_sizes"),
                     ("schedule.warmup_epochs=1e308", "schedule.warmup_epochs"),
                     ("memory.budget=" + "9" * 400, "memory.budget"), ("train.steps=" + "7" * 5000, "train.steps"),
                     ("train.steps=true", "train.steps"), ("model.channels=[true,8]", "model.channels"),
                     ("data.name=digits data.test_fraction=0.9999", "data.test_fraction")]],
    ("model.width=1e10", lambda ws, run: ["train", *SMALL, "model.name=mlp", "model.width=1e10", "--out",
                                          str(ws / "new")], 2, "model.width"),
    ("model.d_model=1e6", lambda ws, run: ["train", "log.progress=off", "data.name=text", "data.max_chars=20000",
                                           "model.name=transformer", "model.d_model=1e6", "model.n_head=1",
                                           "--out", str(ws / "new")], 2, "memory"),
    ("an empty training split from a small npz", lambda ws, run: [
        "train", *SMALL[1:], "data.name=npz", "data.test_fraction=0.9",
        f"data.path={_npz(ws / 'two.npz', x=np.ones((2, 4), np.float32), y=np.array([0, 1]))}",
        "--out", str(ws / "new")], 2, "data"),
    ("plan --budget of 400 digits", lambda ws, run: ["plan", *SMALL, "--budget", "9" * 400], 2, "--budget"),
    ("YAML nested 3000 deep", lambda ws, run: ["train", "--config", str(_write(ws / "c.yaml", "a: " + "[" * 3000
                                                                               + "]" * 3000)), "--print-config"],
     2, "nested"),
    ("a billion-laughs alias as optim.exclude", lambda ws, run: ["train", "--config", str(_write(ws / "c.yaml", BOMB)),
                                                                 "--print-config"], 2, "aliases"),
    # data files of the wrong kind
    ("a .npy named .npz", lambda ws, run: ["train", *SMALL, "data.name=npz", f"data.path={_npy(ws / 'a.npz')}",
                                           "--out", str(ws / "new")], 2, "single"),
    ("a CSV whose first row is 1,abc,0", lambda ws, run: [
        "train", *SMALL, "data.name=csv", f"data.path={_write(ws / 'a.csv', '1,abc,0' + chr(10) + '1,2,1' * 1)}",
        "--out", str(ws / "new")], 2, "non-numeric"),
    ("complex-valued features", lambda ws, run: [
        "train", *SMALL, "data.name=npz",
        f"data.path={_npz(ws / 'c.npz', x=np.ones((8, 4), np.complex64), y=np.arange(8) % 2)}",
        "--out", str(ws / "new")], 2, "real numbers"),
    # found by a hostile-input probe of the first version of this suite
    ("a newline in an override's key", lambda ws, run: ["train", "optim.l\nr=1"], 2, "optim.l\\nr"),
    ("a newline in --config's path", lambda ws, run: ["train", "--config", "no\nsuch.yaml"], 2, "no\\nsuch"),
    ("a NUL in data.cache_dir", lambda ws, run: ["train", *SMALL, 'data.cache_dir="a\\0b"', "--out",
                                                  str(ws / "new")], 2, "NUL"),
    ("bytes in model.args", lambda ws, run: ["train", *SMALL, "model.args.x=!!binary /w==", "--print-config"],
     2, "bytes"),
    ("a compile backend that is not installed", lambda ws, run: ["train", *SMALL, "train.compile=true",
                                                                 "train.compile_backend=tvm", "--out",
                                                                 str(ws / "new")], 2, "tvm"),
    ("resume with a compile backend that is not installed", lambda ws, run: [
        "train", "--resume", str(run), "train.steps=8", "train.compile=true", "train.compile_backend=tvm"], 2, "tvm"),
    ("a refused resume leaves no lock", lambda ws, run: [(run / ".gradwise.lock").unlink(),
                                                         _write(run / "metrics.jsonl", b"\xff\xfe"),
                                                         "train", "--resume", str(run), "train.steps=8"][2:],
     2, "metrics.jsonl"),
    ("npz values beyond float32", lambda ws, run: [
        "train", *SMALL, "data.name=npz",
        f"data.path={_npz(ws / 'big.npz', x=np.full((20, 4), 1e300), y=np.arange(20) % 2)}",
        "--out", str(ws / "new")], 2, "float32"),
    ("a CSV value beyond float32", lambda ws, run: [
        "train", *SMALL, "data.name=csv", f"data.path={_write(ws / 'big.csv', '1e39,2,0' + chr(10) + '1,2,1')}",
        "--out", str(ws / "new")], 2, "float32"),
    ("npz features of width 0", lambda ws, run: [
        "train", *SMALL, "model.name=mlp", "data.name=npz",
        f"data.path={_npz(ws / 'w0.npz', x=np.ones((20, 0), np.float32), y=np.arange(20) % 2)}",
        "--out", str(ws / "new")], 2, "no features"),
    ("export over a user's state dict of the same shapes", lambda ws, run: [
        torch.save({k: torch.zeros_like(v) for k, v in torch.load(run / "checkpoints/last.pt",
                                                                    weights_only=True)["model"].items()},
                   ws / "mine.pt"), "export", str(run), "--out", str(ws / "mine.pt")][1:], 2, "did not write"),
    ("--rdzv-timeout nan", lambda ws, run: ["train", *SMALL, "--nproc", "2", "--rdzv-timeout", "nan", "--out",
                                            str(ws / "new")], 2, "--rdzv-timeout"),
    ("a staleness histogram of 1e400 gradients", lambda ws, run: [
        "train", *SMALL, "--strategy", "simulate",
        f"ps.delay={_write(ws / 'summary.json', HUGE_HISTOGRAM)}",
        "--out", str(ws / "new")], 2, "ps.delay"),
    ("a zip that is not an npz", lambda ws, run: [
        zipfile.ZipFile(ws / "z.npz", "w").writestr("readme.txt", "hi"), "train", *SMALL, "data.name=npz",
        f"data.path={ws / 'z.npz'}", "--out", str(ws / "new")][1:], 2, "lacks"),
]


@pytest.mark.parametrize("setup, expected, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_hostile_input_is_refused_in_one_line_and_changes_nothing(finished_run, tmp_path, capsys, setup,
                                                                       expected, fragment):
    run = copy_run(finished_run, tmp_path / "run")
    argv = setup(tmp_path, run)
    before = snapshot(tmp_path)
    code, out, err = run_cli(argv, capsys)
    if expected == 0:
        assert code == 0 and not err.strip(), err
    else:
        line = check_refusal(code, err, expected)
        assert fragment is None or fragment in line, line
    assert snapshot(tmp_path) == before  # every file byte-identical, nothing new (no config.yaml, no lock)


def test_a_script_under_gradwise_run_exits_2_with_one_line(tmp_path):
    script = _write(tmp_path / "train.py", textwrap.dedent("""\
        import torch, gradwise
        from torch.utils.data import TensorDataset

        def main():
            data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
            gradwise.Trainer(torch.nn.Linear(4, 2), data, optimizer="adam").fit()

        gradwise.run(main)
        """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("gradwise: argument error: optimizer='adam'") and "Traceback" not in done.stderr


def test_export_and_report_replace_only_what_they_wrote(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    for argv in (["export", str(run), "--out", str(tmp_path / "m.pt")],
                 ["report", str(run), "--out", str(tmp_path / "r.html")]):
        assert run_cli(argv, capsys)[0] == 0
        assert run_cli(argv, capsys)[0] == 0  # run again: its own earlier output is replaced
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())


class _BadLength(torch.utils.data.Dataset):
    def __getitem__(self, i):
        return torch.zeros(6), 0

    def __len__(self):
        return -1


def _api_cases():
    """(id, call, expected error class) for the Python API: each bad argument refused at the call."""
    from torch import nn
    from torch.utils.data import TensorDataset

    import gradwise
    from gradwise import Trainer
    from gradwise.asynchronous.worker import UserRun
    from gradwise.errors import ArgumentTypeError, ArgumentValueError, ConfigError
    from gradwise.train.checks import BatchError

    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    model = lambda: nn.Linear(6, 3)  # noqa: E731
    narrow = TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,)))
    cfg = {"train": {"steps": 2}, "log": {"progress": "off", "plots": False}}
    return [
        ("model None", lambda out: Trainer(None, data, out_dir=out), ArgumentTypeError),
        ("a model with no parameters", lambda out: Trainer(nn.ReLU(), data, out_dir=out), ArgumentValueError),
        ("config a bad dict", lambda out: Trainer(model(), data, config={"optim": {"lr": -1}}, out_dir=out),
         ConfigError),
        ("config a list", lambda out: Trainer(model(), data, config=[1], out_dir=out), ArgumentTypeError),
        ("train_data None", lambda out: Trainer(model(), None, out_dir=out), ArgumentTypeError),
        ("train_data a path", lambda out: Trainer(model(), "data.csv", out_dir=out), ArgumentTypeError),
        ("optimizer='adam'", lambda out: Trainer(model(), data, optimizer="adam", out_dir=out), ArgumentTypeError),
        ("scheduler='cosine'", lambda out: Trainer(model(), data, scheduler="cosine", out_dir=out), ArgumentTypeError),
        ("callbacks=object()", lambda out: Trainer(model(), data, callbacks=object(), out_dir=out), ArgumentTypeError),
        ("callbacks=[1]", lambda out: Trainer(model(), data, callbacks=[1], out_dir=out), ArgumentTypeError),
        ("out_dir=123", lambda out: Trainer(model(), data, out_dir=123), ArgumentTypeError),
        ("metrics a list", lambda out: Trainer(model(), data, metrics=["acc"], out_dir=out), ArgumentTypeError),
        ("a metric named 'top 5'", lambda out: Trainer(model(), data, metrics={"top 5": lambda o, t: o.sum()},
                                                      out_dir=out), ArgumentValueError),
        ("task=3", lambda out: Trainer(model(), data, task=3, out_dir=out), ArgumentTypeError),
        ("fit(max_steps='abc')", lambda out: Trainer(model(), data, config=cfg, out_dir=out).fit(max_steps="abc"),
         ArgumentTypeError),
        ("fit(max_steps=0)", lambda out: Trainer(model(), data, config=cfg, out_dir=out).fit(max_steps=0),
         ArgumentValueError),
        ("fit(resume='yes')", lambda out: Trainer(model(), data, config=cfg, out_dir=out).fit(resume="yes"),
         ArgumentTypeError),
        ("count_fn returning a string", lambda out: Trainer(model(), data, count_fn=lambda t: "n", out_dir=out),
         BatchError),
        ("test_data of the wrong width beside val_data",
         lambda out: Trainer(model(), data, val_data=data, test_data=narrow, config=cfg, out_dir=out), BatchError),
        ("evaluate('abc')", lambda out: Trainer(model(), data, config=cfg).evaluate("abc"), ArgumentTypeError),
        ("from_config('x.yaml')", lambda out: Trainer.from_config("x.yaml", out_dir=out), ArgumentTypeError),
        ("inspect(steps=0)", lambda out: gradwise.inspect(model(), data, steps=0), ArgumentValueError),
        ("plan(budget='lots')", lambda out: gradwise.plan(model(), data, budget="lots"), ArgumentValueError),
        ("inspect_precision(config=5)", lambda out: gradwise.inspect_precision(model(), data, config=5),
         ArgumentTypeError),
        ("UserRun(model=None)", lambda out: UserRun(model=None, data=lambda: (data, None)), ArgumentTypeError),
        # found by a hostile-input probe of the first version of this suite
        ("a generator as train_data", lambda out: Trainer(model(), (r for r in data), out_dir=out),
         ArgumentTypeError),
        ("a dataset whose __len__ is -1", lambda out: Trainer(model(), _BadLength(), out_dir=out), ArgumentValueError),
        ("evaluate(a set of the wrong width)", lambda out: Trainer(model(), data, config=cfg).evaluate(narrow),
         BatchError),
        ("evaluate(prefix=5)", lambda out: Trainer(model(), data, config=cfg).evaluate(data, prefix=5),
         ArgumentValueError),
        ("source=5", lambda out: Trainer(model(), data, source=5, out_dir=out), ArgumentTypeError),
        ("out_dir=''", lambda out: Trainer(model(), data, out_dir=""), ArgumentValueError),
        ("out_dir with a NUL", lambda out: Trainer(model(), data, out_dir="a\x00b"), ArgumentValueError),
        ("load_config(5)", lambda out: gradwise.load_config(5), ArgumentTypeError),
        ("load_config(None, [5])", lambda out: gradwise.load_config(None, [5]), ArgumentTypeError),
        ("Trainer.resume(run, [5])", lambda out: Trainer.resume(out, [5]), ArgumentTypeError),
        ("inspect(callbacks=5)", lambda out: gradwise.inspect(model(), data, callbacks=5), ArgumentTypeError),
        ("plan(precisions=['fp64'])", lambda out: gradwise.plan(model(), data, budget="1GiB", precisions=["fp64"]),
         ArgumentValueError),
        ("plan(budget=2**80)", lambda out: gradwise.plan(model(), data, budget=2**80), ArgumentValueError),
        ("a nan in the first batch", lambda out: Trainer(model(), TensorDataset(torch.full((8, 6), float("nan")),
                                                                             torch.zeros(8, dtype=torch.long)),
                                                         out_dir=out), BatchError),
        ("train_async(workers=0)", lambda out: __import__("gradwise.asynchronous.ps", fromlist=["x"]).train_async(
            gradwise.Config(), 0, out), ArgumentValueError),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("call, error", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_each_bad_python_argument_raises_gradwises_one_line_error(tmp_path, call, error):
    from gradwise.errors import ArgumentTypeError, UserInputError

    out = tmp_path / "run"
    with pytest.raises(error) as caught:
        call(out)
    assert isinstance(caught.value, UserInputError)
    assert isinstance(caught.value, TypeError if isinstance(caught.value, ArgumentTypeError) else ValueError)
    assert "\n" not in str(caught.value)
    assert not out.exists()  # refused before the run folder was made


def test_report_plots_only_numbers_a_plot_can_place(finished_run, tmp_path, capsys):
    """A damaged but parseable metrics.jsonl (a 400-digit step, an infinite loss) still gives a report."""
    run = copy_run(finished_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 1%s, "train_loss": 1}\n{"kind": "train", "step": 5, "train_loss": 1e999}\n'
                % ("0" * 400))
    code, _, err = run_cli(["report", str(run), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 0 and "Traceback" not in err and not err.strip(), err


def test_names_with_dashes_and_slashes_stay_allowed():
    """Metric names and result prefixes are keys, not identifiers: 'top-5' and 'val/ood' are fine."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from gradwise import Trainer

    data = TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    trainer = Trainer(nn.Linear(6, 3), data, metrics={"top-5": lambda o, t: (o.argmax(1) == t).float().mean()},
                      config={"log": {"progress": "off"}})
    assert "val/ood_top-5" in trainer.evaluate(data, prefix="val/ood")
