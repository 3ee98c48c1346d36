"""A model and data of yours named by import path (`model.factory`, `data.factory`): every command on the example
package examples/my_gpt, as docs/your_model.md runs them, and each bad path or return in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradwise.checkpoint.format import params_sha256
from gradwise.config import load_config
from gradwise.errors import ConfigError
from gradwise.train import Trainer
from gradwise.train.factories import config_data
from launching import assert_same_weights, in_process, summary

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# the example package, small: two 32-wide GPT-2 blocks on 32-byte windows; SGD, since Adam turns the rounding noise
# in a gradient that is zero in exact arithmetic (attention's key bias) into full-size steps that differ between
# one process and two
MY_GPT = ["--config", "my_gpt/config.yaml", "optim.name=sgd", "optim.lr=0.1", "model.args.n_embd=32",
          "model.args.context=32", "data.args.context=32",
          "data.args.max_bytes=20000", "train.batch_size=8", "train.eval_every=null", "train.checkpoint_every=3",
          "log.progress=off", "log.plots=false", "diagnostics.every=0"]
BAD = '''
import torch
NOT_CALLABLE = 3
def a_dict(**args): return {"a": 1}
def a_number(**args): return 5
def a_bad_key(**args): return {"train": [torch.zeros(2)], "eval": []}
def no_train(**args): return {"test": [torch.zeros(2)]}
def two_validations(**args): return {"train": [torch.zeros(2)], "val": [], "validation": []}
def a_string_as_a_set(**args): return {"train": "rows"}
def a_pair(**args): return [torch.zeros(2)], [torch.zeros(2)]
'''


@pytest.fixture
def in_examples(monkeypatch):
    """Commands run from examples/, where the package is (the current directory is importable)."""
    monkeypatch.chdir(EXAMPLES)


def sha(run: Path) -> str:
    return summary(run)["params_sha256"]


def test_factory_keys_are_checked_and_config_yaml_keeps_only_what_applies():
    cfg = load_config(EXAMPLES / "my_gpt" / "config.yaml")
    assert (cfg.model.factory, cfg.model.args["n_layer"], cfg.data.factory) == \
        ("my_gpt.models:build", 2, "my_gpt.data:build")
    text = cfg.to_yaml()
    assert "mnist1d" not in text and "kernel_sizes" not in text  # the built-in keys the factories replace
    from gradwise.config.loading import yaml_load, validate

    assert validate(yaml_load(text)).to_dict() == cfg.to_dict()  # read back: the same config
    for overrides, message in [
        (["model.factory=not a path"], "model.factory='not a path' is not an import path"),
        (["model.factory=pkg:build", "model.depth=3"], "model.depth=3 is a key of the built-in models"),
        (["model.factory=pkg:build", "data.factory=pkg:data", "data.name=digits"],
         "data.name='digits' is a key of the built-in datas"),
        (["data.factory=pkg:data"], "data.factory='pkg:data' needs model.factory"),
        (["model.args.n_layer=2"], "model.args needs model.factory"),
        (["model.loss=pkg:loss"], "model.loss needs model.factory"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_config(None, overrides)


ERRORS = [
    (["model.factory=no_such_pkg.models:build"], "model.factory='no_such_pkg.models:build' does not import: "
                                                 "ModuleNotFoundError: No module named 'no_such_pkg'"),
    (["model.factory=my_gpt.models:nope"], "my_gpt.models has no 'nope' (its own callables: build)"),
    (["model.factory=BAD:NOT_CALLABLE"], "is an int, not a callable"),
    (["model.factory=BAD:a_dict"], "model.factory='BAD:a_dict' returned a dict, not a torch.nn.Module"),
    (["model.factory=my_gpt.models:build", "model.args.n_layr=4"],
     "cannot be called with model.args={'n_layer': 2, 'n_embd': 32, 'n_head': 2, 'context': 32, 'n_layr': 4}: got "
     "an unexpected keyword argument 'n_layr' (it takes: n_layer, n_embd, n_head, context, dropout)"),
    (["model.factory=missing/file.py:build"], "/examples/missing/file.py:build': there is no file "),  # absolute
    (["data.factory=BAD:a_number"], "returned an int; allowed: a Dataset, a DataLoader, or a dict of train"),
    (["data.factory=BAD:a_bad_key"], "returned a dict with the key 'eval'; allowed: train, val (or validation)"),
    (["data.factory=BAD:no_train"], "returned a dict without a 'train' set (keys: test)"),
    (["data.factory=BAD:two_validations"], "returned a dict with both 'val' and 'validation'"),
    (["data.factory=BAD:a_string_as_a_set"], "returned train=a str, which is not a Dataset or a DataLoader"),
    (["data.factory=BAD:a_pair"], "returned a tuple of 2; return a dict naming the sets"),
    (["model.loss=torch.nn.functional:no_such_loss"], "model.loss='torch.nn.functional:no_such_loss': "
                                                       "torch.nn.functional has no 'no_such_loss'"),
]
COMMANDS = [["train", "--nproc", "2"], ["train", "--strategy", "async"], ["train", "--strategy", "simulate"],
            ["inspect"], ["inspect", "precision"], ["plan", "--budget", "1GiB"]]


@pytest.mark.parametrize("command, overrides, message", [
    *((["train"], overrides, message) for overrides, message in ERRORS),  # every error, and three on every command
    *((command, overrides, message) for command in COMMANDS for overrides, message in ERRORS[:5:2])])
def test_a_bad_import_path_or_return_is_one_line_exit_2_before_anything_starts(command, overrides, message,
                                                                                 in_examples, tmp_path, capsys):
    """Each command fails in one line, before any process, Ray or training starts, and writes nothing."""
    bad = tmp_path / "bad.py"
    bad.write_text(BAD)
    given = [o.replace("BAD", str(bad)) for o in overrides]
    keys = {o.split("=")[0] for o in given}
    defaults = [d for d in ("model.factory=my_gpt.models:build", "data.factory=my_gpt.data:build")
                if d.split("=")[0] not in keys]
    out = tmp_path / "run"
    extra = ["--out", str(out)] if command[0] == "train" else []
    assert in_process(*command, *MY_GPT, *defaults, *given, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()  # plan's progress line may come first
    errors = [line for line in err if line.startswith("gradwise:")]
    assert len(errors) == 1 and errors[0] == err[-1] and message.replace("BAD", str(bad)) in errors[0], err
    assert not out.exists()


def test_the_example_package_trains_resumes_and_every_tool_runs_on_it(in_examples, tmp_path, capsys):
    """`gradwise train`, `--resume`, `--strategy simulate`, `inspect`, `inspect precision`, `plan`, `export`,
    `report` and `compare` on examples/my_gpt by import path, as docs/your_model.md runs them."""
    straight, part = tmp_path / "straight", tmp_path / "part"
    assert in_process("train", *MY_GPT, "train.steps=6", "--out", str(straight)) == 0
    recorded = (straight / "config.yaml").read_text()
    assert "factory: my_gpt.models:build" in recorded and "n_embd: 32" in recorded
    assert "GPT2LMHeadModel" in recorded.splitlines()[0]  # what was trained, named on the first line
    s = summary(straight)
    assert (s["model_class"], s["data_class"], s["task"]) == ("GPT2LMHeadModel", "ByteLines", "language_model")
    assert in_process("train", *MY_GPT, "train.steps=3", "--out", str(part)) == 0
    assert in_process("train", "--resume", str(part), "train.steps=6") == 0  # rebuilt from config.yaml's paths
    assert sha(part) == sha(straight)

    simulated, simulated_part = tmp_path / "simulated", tmp_path / "simulated_part"
    assert in_process("train", *MY_GPT, "train.steps=6", "--strategy", "simulate", "--workers", "4",
                      "--out", str(simulated)) == 0
    assert in_process("train", *MY_GPT, "train.steps=3", "--strategy", "simulate", "--workers", "4",
                      "--out", str(simulated_part)) == 0
    assert in_process("train", "--resume", str(simulated_part), "train.steps=6", "--strategy", "simulate",
                      "--workers", "4") == 0
    assert sha(simulated_part) == sha(simulated) != sha(straight)
    capsys.readouterr()

    assert in_process("inspect", *MY_GPT, "--steps", "2", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["model"], report["block_class"], report["blocks"]) == ("GPT2LMHeadModel", "GPT2Block", 2)
    assert report["verdict"]["verdict"] == "healthy" and report["jacobian_mean_sq_singular_value_at_init"] > 0
    assert in_process("inspect", "precision", *MY_GPT, "--steps", "2") == 0
    assert "recommended: precision=bf16" in capsys.readouterr().out
    plan_json = tmp_path / "plan.json"
    assert in_process("plan", *MY_GPT, "--budget", "1GiB", "--trial-steps", "1", "--json", str(plan_json)) == 0
    out = capsys.readouterr().out
    assert "| GPT2Block |" in out and "fastest that fits: train.accumulate=" in out
    assert {r["checkpoint"] for r in json.loads(plan_json.read_text())["rows"]} == {"none", "GPT2Block"}

    exported = tmp_path / "model.pt"
    assert in_process("export", str(straight), "--out", str(exported)) == 0
    state = torch.load(exported, weights_only=True)
    from my_gpt.models import build

    model = build(n_embd=32, context=32)
    model.load_state_dict(state)
    assert params_sha256(model) == sha(straight)
    assert in_process("report", str(straight)) == 0
    assert "GPT2LMHeadModel" in (straight / "report.html").read_text()
    assert in_process("compare", str(straight), str(simulated), "--out", str(tmp_path / "compare.html")) == 0


def test_from_config_builds_a_factorys_sets_and_adopts_the_dataloader_it_returns(in_examples, tmp_path):
    """`Trainer.from_config` of a config with factories: the dict's validation set and collate function are
    used, both builds start from the same weights (seeded), and a DataLoader a factory returns is adopted (its
    batch size becomes train.batch_size)."""
    cfg = load_config(None, [*MY_GPT[2:], "model.factory=my_gpt.models:build", "data.factory=my_gpt.data:build",
                             "train.steps=1"])
    trainer, again = Trainer.from_config(cfg), Trainer.from_config(cfg)
    data = config_data(cfg)
    assert len(trainer.data["val"].dataset) == len(data.val) and trainer.data["train"].collate_fn is data.collate_fn
    assert params_sha256(trainer.model) == params_sha256(again.model)
    assert trainer.fit()["steps"] == 1
    loader = tmp_path / "loader.py"
    loader.write_text("from torch.utils.data import DataLoader\nfrom my_gpt.data import build\n"
                      "def loader(context, max_bytes):\n    sets = build(context, max_bytes)\n"
                      "    return DataLoader(sets['train'], batch_size=6, shuffle=True,\n"
                      "                      collate_fn=sets['collate_fn'])\n")
    unbatched = [o for o in MY_GPT[2:] if not o.startswith("train.batch_size")]
    adopted = Trainer.from_config(load_config(None, [*unbatched, "train.steps=1",
                                                     "model.factory=my_gpt.models:build",
                                                     f"data.factory={loader}:loader"]))
    assert adopted.cfg.train.batch_size == 6 and adopted.fit()["steps"] == 1


def test_the_example_package_data_parallel_sharded_and_on_the_parameter_server_resumed(in_examples, tmp_path):
    """`--nproc 2 --strategy fsdp` resumed with `--nproc 2` (ddp) ends on the one-process run's weights (within
    1e-5: another reduction order); `--strategy async --workers 1` ends on its params_sha256 exactly (one worker
    applies each gradient to the weights it was computed on: plain training). Every process and Ray actor
    builds the model and data from the config's import paths (a resume: config.yaml's)."""
    one, sharded, served = tmp_path / "one", tmp_path / "sharded", tmp_path / "served"
    assert in_process("train", *MY_GPT, "train.steps=6", "--out", str(one)) == 0
    assert in_process("train", *MY_GPT, "train.steps=3", "--nproc", "2", "--strategy", "fsdp",
                      "--out", str(sharded)) == 0
    assert in_process("train", "--resume", str(sharded), "train.steps=6", "--nproc", "2", "--strategy", "ddp") == 0
    assert_same_weights(sharded, one)
    assert summary(sharded)["world_size"] == 2 and summary(sharded)["resumed_from"] == 3
    assert in_process("train", *MY_GPT, "train.steps=6", "--strategy", "async", "--workers", "1",
                      "--out", str(served)) == 0
    assert sha(served) == sha(one)


def test_plan_over_two_processes_measures_ddp_and_fsdp_per_process(in_examples, tmp_path, capfd):
    """`gradwise plan --nproc 2`: every trial runs on the group; under FSDP a process holds half the parameters
    and optimizer state of a DDP replica (shards), the same fp32 activations (in bf16 fewer: FSDP gathers bf16
    weights and frees them, where autocast keeps its bf16 copies of the weights for backward), and the choice
    names the strategy."""
    table = tmp_path / "plan.json"
    assert in_process("plan", *MY_GPT, "--budget", "1GiB", "--nproc", "2", "--trial-steps", "1",
                      "--json", str(table)) == 0
    rows = json.loads(table.read_text())["rows"]
    setting = {(r["strategy"], r["accumulate"], r["checkpoint"], r["precision"]): r for r in rows}
    assert {key[0] for key in setting} == {"ddp", "fsdp"} and len(rows) == 2 * 3 * 2 * 3  # micro 1, 2, 4 per rank
    for (strategy, *choice), fsdp in setting.items():
        if strategy == "fsdp":
            ddp = setting[("ddp", *choice)]
            for part in ("params_bytes", "optimizer_bytes"):
                assert 0.45 < fsdp[part] / ddp[part] < 0.6, (choice, part)
            assert fsdp["activation_bytes"] == ddp["activation_bytes"] if choice[2] == "fp32" else \
                fsdp["activation_bytes"] <= ddp["activation_bytes"]
    assert "train.strategy=" in capfd.readouterr().out


def test_a_file_path_is_recorded_absolute_so_a_resume_from_elsewhere_finds_it(in_examples, tmp_path, monkeypatch):
    run = tmp_path / "files"
    files = ["model.factory=my_gpt/models.py:build", "data.factory=my_gpt/data.py:build"]
    assert in_process("train", *MY_GPT, *files, "train.steps=2", "--out", str(run)) == 0
    assert f"factory: {EXAMPLES / 'my_gpt' / 'models.py'}:build" in (run / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    assert in_process("train", "--resume", str(run), "train.steps=3") == 0
    assert summary(run)["steps"] == 3
