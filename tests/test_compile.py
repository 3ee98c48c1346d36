"""train.compile: the same training as eager, checkpoints with the model's own keys, resume across, bad keys refused.

The mechanics (tracing, autograd through the compiled graph, DDP/FSDP wrapping) are exercised with torch's
`aot_eager` backend, which runs the traced graphs without generating code: seconds instead of a minute.
One run uses inductor, the default backend, on a tiny model.
"""

import json

import pytest
import torch

from gradwise import Trainer, load_config
from gradwise.errors import ConfigError
from gradwise.resolve import resolve_config
from gradwise.train import StepEngine

from conftest import SMALL, small_config

BASE = [*SMALL, "optim.name=sgd", "optim.lr=0.05", "schedule.name=constant", "seed=3"]


def run_cli(args):
    from gradwise.cli import main

    return main(args)


def read(run_dir, name="summary.json"):
    return json.loads((run_dir / name).read_text())


def final_params(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("extra", [[], ["train.accumulate=3", "memory.checkpoint=all", "train.clip_norm=1.0"]])
def test_compiled_run_matches_eager_and_resumes_either_way(tmp_path, extra):
    compiled = ["train.compile=true", "train.compile_backend=aot_eager"]
    assert run_cli(["train", "--out", str(tmp_path / "eager"), "train.steps=12", *BASE, *extra]) == 0
    assert run_cli(["train", "--out", str(tmp_path / "compiled"), "train.steps=12", *BASE, *extra, *compiled]) == 0
    eager, comp = final_params(tmp_path / "eager"), final_params(tmp_path / "compiled")
    assert list(comp) == list(eager)  # the model's own state_dict keys, no `_orig_mod.` prefix
    for key in eager:
        torch.testing.assert_close(comp[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)
    summary = read(tmp_path / "compiled")
    assert summary["compile_warmup_seconds"] > 0
    records = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "compile"] == [1]
    # an eager half resumed compiled, and a compiled half resumed eager, end where the straight runs do
    assert run_cli(["train", "--out", str(tmp_path / "half"), "train.steps=6", *BASE, *extra]) == 0
    assert run_cli(["train", "--resume", str(tmp_path / "half"), "train.steps=12", *compiled]) == 0
    for key, value in final_params(tmp_path / "half").items():
        torch.testing.assert_close(value, eager[key], rtol=1e-5, atol=1e-6, msg=key)
    assert run_cli(["train", "--out", str(tmp_path / "half2"), "train.steps=6", *BASE, *extra, *compiled]) == 0
    assert run_cli(["train", "--resume", str(tmp_path / "half2"), "train.steps=12", "train.compile=false"]) == 0
    for key, value in final_params(tmp_path / "half2").items():
        torch.testing.assert_close(value, eager[key], rtol=1e-5, atol=1e-6, msg=key)


def test_inductor_compiles_a_users_model_and_trains_like_eager():
    def train(compile_: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
        x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
        cfg = load_config(None, ["train.steps=4", "train.batch_size=32", "optim.name=sgd", "optim.lr=0.1",
                                 "log.progress=off", f"train.compile={str(compile_).lower()}"])
        trainer = Trainer(model, torch.utils.data.TensorDataset(x, y), config=cfg)
        return trainer.fit(), model

    from torch._dynamo.utils import counters

    counters.clear()
    (eager_summary, eager), (summary, compiled) = train(False), train(True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really traced the model (no silent eager fallback)
    assert summary["compile_warmup_seconds"] > 0 and "compile_warmup_seconds" not in eager_summary
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_keys_are_checked_before_training(capsys):
    cfg = resolve_config(small_config("train.compile=true", "train.compile_backend=no-such-backend"), 400)
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="train.compile_backend='no-such-backend' is not a torch.compile backend"):
        StepEngine(model, cfg)
    assert run_cli(["train", *SMALL, "train.compile=true", "train.compile_mode=max-autotune",
                    "train.compile_backend=aot_eager"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.compile_mode=max-autotune needs train.compile_backend=inductor" in err[0]
