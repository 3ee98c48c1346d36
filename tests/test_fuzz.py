"""Generated hostile input (hypothesis): config overrides, YAML documents, command lines and Python API calls.

The contract under test, whatever is generated: a command ends with status 0 or 2, a refusal is one line with no
traceback, every file that existed before is byte-identical after; a config either validates (and then reads
back from its own YAML unchanged, and trains or is refused in one line) or is refused in one line; a Python call
either works or raises gradwise's UserInputError that is also a TypeError or ValueError. The runs are
derandomized (the same cases every time, so CI is repeatable); `FUZZ_SEED=N` draws a different set and
`FUZZ_SCALE=K` K times as many.
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from gradwise import Trainer
from gradwise.config import Config, flatten, load_config, validate, yaml_load
from gradwise.errors import ArgumentTypeError, ConfigError, NonFiniteError, UserInputError

from conftest import SMALL
from hostile import check_refusal, make_run, run_cli, snapshot

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "0"))
FUZZ_SCALE = float(os.environ.get("FUZZ_SCALE", "1"))  # more examples per property, for a search beyond CI's


def fuzz(examples: int):
    """Settings shared by every property: a fixed seed (FUZZ_SEED), no example database, no deadline."""
    def wrap(test):
        test = settings(max_examples=int(examples * FUZZ_SCALE), deadline=None, database=None,
                        derandomize=FUZZ_SEED == 0, suppress_health_check=list(HealthCheck))(test)
        return seed(FUZZ_SEED)(test) if FUZZ_SEED else test

    return wrap


KEYS = list(flatten(Config().to_dict()))
UNKNOWN = ["optim.nme", "train", "model.depth.x", "x", "data.args.n", "model.args.k", "ps", "a.b.c.d"]

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-3, max_value=600),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-2, max_value=2), st.booleans(),
    st.none(), st.text(max_size=12), st.sampled_from(["cnn", "mlp", "sgd", "lamb", "cosine", "fp16", "every:2",
                                                       "2GiB", "0x10", "1e-3", ".inf", "~", "[", "{a: 1}"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(string.ascii_lowercase, min_size=1, max_size=6), inner, max_size=3), max_leaves=8)


def as_text(value) -> str:
    """A value as the text of an override (YAML flow style), or a raw string half the time for text."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


keys = st.sampled_from(KEYS + UNKNOWN) | st.text(max_size=8)  # text: control characters, dots, '=' in a key
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={as_text(kv[1])}"), min_size=1, max_size=4)


@fuzz(600)
@given(overrides)
def test_generated_overrides_validate_or_are_refused_in_one_line(texts):
    try:
        cfg = load_config(None, texts)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("config error:")
        return
    assert validate(yaml_load(cfg.to_yaml())) == cfg  # what config.yaml records reads back as the same config


# keys of a small run, with values at and past their edges (what validates must train or be refused in one line)
SMALL_RUN_VALUES = {
    "optim.name": st.sampled_from(["sgd", "adam", "adamw", "lars", "lamb"]),
    "optim.lr": st.sampled_from([1e-300, 1e-3, 0.5, 10.0, 1e30]),
    "optim.momentum": st.sampled_from([0, 0.5, 0.999999]),
    "optim.betas": st.sampled_from([[0, 0], [0.9, 0.999], [0.999999, 0.999999]]),
    "optim.eps": st.sampled_from([1e-300, 1e-8, 10.0]),
    "optim.weight_decay": st.sampled_from([0, 0.1, 1e6]),
    "optim.trust_clip": st.sampled_from([None, 1e-9, 1.0]),
    "schedule.name": st.sampled_from(["constant", "cosine", "poly", "step"]),
    "schedule.warmup_steps": st.integers(0, 5),
    "schedule.warmup_epochs": st.sampled_from([None, 1e-9, 0.5, 1e9]),
    "schedule.total_steps": st.sampled_from([None, 1, 2**62]),
    "schedule.step_every": st.sampled_from([None, 1, 2**62]),
    "schedule.scale_rule": st.sampled_from(["none", "linear", "sqrt"]),
    "schedule.base_batch": st.sampled_from([1, 256, 2**40]),
    "train.batch_size": st.sampled_from([1, 2, 3, 64, 600, 10**6]),
    "train.accumulate": st.sampled_from([1, 2, 3, 7]),
    "train.clip_norm": st.sampled_from([None, 1e-30, 1.0]),
    "train.clip_value": st.sampled_from([None, 1e-30, 1.0]),
    "train.drop_last": st.booleans(),
    "train.eval_batch_size": st.sampled_from([1, 7, 10**6]),
    "model.name": st.sampled_from(["cnn", "mlp"]),
    "model.depth": st.integers(1, 3),
    "model.width": st.sampled_from([1, 2, 16]),
    "model.activation": st.sampled_from(["relu", "gelu", "tanh", "silu"]),
    "model.residual": st.sampled_from([None, "none", "residual", "rezero", "highway"]),
    "model.norm": st.sampled_from([None, "none", "batch", "layer"]),
    "model.init": st.sampled_from(["default", "xavier", "kaiming", "orthogonal"]),
    "model.dropout": st.sampled_from([0, 0.5, 0.999]),
    "model.channels": st.sampled_from([[1], [8, 8], [4, 4, 4, 4, 4, 4, 4]]),
    "model.kernel_sizes": st.sampled_from([[1], [5, 3], [41], [3, 3, 3, 3, 3, 3, 3]]),
    "data.num_samples": st.sampled_from([10, 11, 50, 500]),
    "data.train_split": st.sampled_from([0.01, 0.5, 0.99]),
    "data.val_fraction": st.sampled_from([0, 0.01, 0.5, 0.99]),
    "precision": st.sampled_from(["fp32", "bf16", "fp16"]),
    "regularize.l1": st.sampled_from([0, 1e6]),
    "diagnostics.every": st.sampled_from([0, 1]),
    "diagnostics.on_nonfinite": st.sampled_from(["stop", "rollback"]),
    "early_stopping.patience": st.sampled_from([None, 1]),
    "memory.checkpoint": st.sampled_from(["none", "all", "sqrt", "every:1", "every:99"]),
}
small_runs = st.dictionaries(st.sampled_from(list(SMALL_RUN_VALUES)), st.just(None), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: SMALL_RUN_VALUES[k] for k in keys}))


@fuzz(60)
@given(small_runs)
def test_generated_small_runs_train_or_are_refused_in_one_line(chosen):
    texts = [*SMALL, "train.steps=2", "train.eval_every=1", "train.checkpoint_every=1",
             *(f"{k}={as_text(v)}" for k, v in chosen.items())]
    try:
        cfg = load_config(None, texts)
        with tempfile.TemporaryDirectory() as out:
            Trainer.from_config(cfg, out_dir=Path(out) / "run").fit()
    except (UserInputError, NonFiniteError) as err:
        assert "\n" not in str(err).strip(), err


documents = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.dictionaries(st.sampled_from(KEYS[:40] + ["optim", "train", "model", "data", "x"]), values, max_size=5)
    .map(lambda d: yaml.safe_dump(d, sort_keys=False)),
    st.tuples(st.integers(1, 400), st.sampled_from(["[", "{a: ", "- "])).map(lambda t: "a: " + t[1] * t[0]),
)


@fuzz(200)
@given(documents, st.sampled_from(["utf-8", "utf-16", "latin-1"]))
def test_generated_yaml_files_print_or_are_refused_in_one_line(document, encoding):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_bytes(document.encode(encoding, errors="replace"))
        code, out, err = _cli(["train", "--config", str(path), "--print-config"])
        if code == 0:
            assert isinstance(yaml.safe_load(out), dict)
        else:
            check_refusal(code, err)


_CAPTURED: list = []  # the capsys of the running test (hypothesis tests take no function-scoped fixture)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    return run_cli(argv, _CAPTURED[-1])


@pytest.fixture(autouse=True)
def _capture(capsys):
    _CAPTURED.append(capsys)
    yield
    _CAPTURED.pop()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A finished run and a user's files beside it, shared by the generated command lines."""
    root = tmp_path_factory.mktemp("fuzz")
    run = make_run(root / "run")
    (root / "notes.txt").write_text("mine\n")
    (root / "page.html").write_text("<p>mine</p>\n")
    (root / "plan.json").write_text('{"mine": 1}\n')
    return root, run, snapshot(root)


def _paths(root: Path, run: Path) -> list[str]:
    return [str(p) for p in (run / "config.yaml", run / "summary.json", run / "metrics.jsonl",
                             run / "checkpoints" / "last.pt", run / "checkpoints", run, root / "notes.txt",
                             root / "page.html", root / "plan.json", root / "new" / "out.html",
                             root / "missing" / "deep" / "x.pt", Path("/nonexistent/x.json"))]


FLAGS = ["--out", "--json", "--config", "--resume", "--nproc", "--workers", "--strategy", "--steps", "--budget",
         "--probes", "--trial-steps", "-x", "--", "simulate", "async", "fsdp", "0", "-1", "2", "abc", "precision"]


@st.composite
def command_lines(draw, root: Path, run: Path):
    paths = _paths(root, run)
    command = draw(st.sampled_from([["train", "--print-config"], ["train", "--resume", str(run), "--print-config"],
                                    ["report", str(run)], ["compare", str(run), str(run)], ["export", str(run)],
                                    ["report", draw(st.sampled_from(paths))], ["export", draw(st.sampled_from(paths))],
                                    ["plan", "--budget", draw(st.sampled_from(["0", "-1", "x", "9" * 400, "1e999"]))],
                                    ["inspect", "--steps", draw(st.sampled_from(["0", "-5", "x"]))]]))
    extra = draw(st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(paths), overrides.map(lambda o: o[0])),
                          max_size=4))
    return command + extra


@fuzz(60)
@given(st.data())
def test_generated_command_lines_end_0_or_2_and_change_no_file(workspace, data):
    root, run, owned = workspace  # owned: the run's files and the user's, as they were made
    argv = data.draw(command_lines(root, run))
    before = snapshot(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code, _, err = _cli(argv)
    finally:
        os.chdir(cwd)
    after = snapshot(root)
    if code != 0:
        check_refusal(code, err)
        assert after == before, argv  # a refusal changes nothing and leaves nothing
    assert {k: v for k, v in after.items() if k in owned} == owned, argv  # a command's output may appear, no more


def _api_pools():
    good = TensorDataset(torch.randn(24, 6), torch.randint(0, 3, (24,)))
    bad_values = [None, 0, -1, 2**70, "x", b"x", 1.5, float("nan"), [], [1], {}, {"a": 1}, object(), lambda *a: "x",
                  Path("/nonexistent"), torch.zeros(2), nn.ReLU()]
    return {
        "train_data": [good, TensorDataset(torch.randn(24, 5), torch.randint(0, 3, (24,))), *bad_values],
        "val_data": [None, good, *bad_values], "test_data": [None, good, *bad_values],
        "loss_fn": [None, nn.functional.cross_entropy, *bad_values],
        "optimizer": [None, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), *bad_values],
        "scheduler": [None, *bad_values], "config": [None, {"train": {"steps": 1}}, *bad_values],
        "task": [None, "classification", "other", *bad_values], "count_fn": [None, *bad_values],
        "callbacks": [(), *bad_values], "metrics": [None, {"m": lambda o, t: (o.argmax(1) == t).float().mean()},
                                                     *bad_values],
        "collate_fn": [None, *bad_values],
    }


API_POOLS = _api_pools()


@fuzz(150)
@given(st.dictionaries(st.sampled_from(list(API_POOLS)), st.integers(0, 1) | st.integers(0, 30), max_size=3))
def test_generated_python_calls_work_or_raise_gradwises_one_line_error(choices):
    kwargs = {k: API_POOLS[k][i % len(API_POOLS[k])] for k, i in choices.items()}
    train = kwargs.pop("train_data", API_POOLS["train_data"][0])
    config = kwargs.pop("config", None)
    if config is None or config == {"train": {"steps": 1}}:
        config = {"train": {"steps": 1}, "log": {"progress": "off"}}
    try:
        Trainer(nn.Linear(6, 3), train, config=config, **kwargs).fit()
    except UserInputError as err:
        assert isinstance(err, TypeError if isinstance(err, ArgumentTypeError) else ValueError), err
        assert "\n" not in str(err), err
