"""The memory planner and memory.auto, on a tiny job."""

import json

import pytest
import torch
import transformers
import yaml
from torch.utils.data import TensorDataset

import gradwise
from gradwise.cli import main
from gradwise.config import parse_bytes
from gradwise.errors import ArgumentTypeError, ArgumentValueError
from gradwise.train.checks import BatchError
from gradwise.memory.checkpointing import repeated_blocks
from gradwise.tools.planner import apply_choice, candidate_micro_batches, measure, plan
from gradwise.train import Trainer

from conftest import SMALL, small_config

TINY = [*SMALL, "model.name=mlp", "model.depth=3", "model.width=16", "train.batch_size=32"]


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("500MB") == 500 * 10**6 and parse_bytes("1024") == 1024
    for bad in ("2XB", "-1GiB", "GiB", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_candidates_keep_the_global_batch():
    assert candidate_micro_batches(32) == [1, 2, 4, 8, 16]
    assert candidate_micro_batches(3) == [1, 2]


def test_plan_picks_the_fastest_setting_that_fits():
    cfg = small_config(*TINY[len(SMALL):])
    rows, best = plan(cfg, budget=10**12, trial_steps=1, precisions=("fp32", "bf16"))
    assert len(rows) == len(candidate_micro_batches(32)) * 3 * 2
    assert best is not None and best["fits"]
    assert best["samples_per_s"] == max(r["samples_per_s"] for r in rows)
    # memory is measured, and less of the batch per micro-step keeps fewer activations
    by_micro = {r["accumulate"]: r["activation_bytes"] for r in rows
                if r["checkpoint"] == "none" and r["precision"] == "fp32"}
    assert by_micro[16] < by_micro[1]
    # a budget between the smallest and largest footprint excludes the large ones
    sizes = sorted(r["memory_bytes"] for r in rows)
    rows, best = plan(cfg, budget=sizes[len(sizes) // 2], trial_steps=1, precisions=("fp32", "bf16"))
    assert best is not None and best["memory_bytes"] <= sizes[len(sizes) // 2]
    assert any(not r["fits"] for r in rows)
    chosen = apply_choice(cfg, best)
    assert chosen.train.accumulate == best["accumulate"] and chosen.memory.checkpoint == best["checkpoint"]
    assert chosen.train.batch_size == cfg.train.batch_size and chosen.memory.auto is False


def test_plan_cli_table_and_a_budget_nothing_fits(tmp_path, capsys):
    assert main(["plan", "--budget", "1GiB", "--trial-steps", "1", "--json", str(tmp_path / "p.json"), *TINY]) == 0
    out = capsys.readouterr().out
    assert "| accumulate | micro-batch | checkpoint | precision | memory | samples/s | fits |" in out
    assert "**best**" in out and "fastest that fits:" in out
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["best"] in saved["rows"]
    code = main(["plan", "--budget", "1KiB", "--trial-steps", "1", *TINY])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "nothing fits memory.budget=1KiB" in err and "smallest footprint found is" in err


def test_memory_auto_trains_with_the_chosen_setting(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "train.steps=4", "memory.auto=true", "memory.budget=1GiB", *TINY]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["memory"]["auto"] is False  # a resumed run keeps the plan instead of re-planning
    assert "planning: chose" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r2"), "memory.auto=true", "memory.budget=1KiB", *TINY]) == 2
    assert not (tmp_path / "r2").exists()


# -- a model of your own ---------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))

    def forward(self, h):
        return h + self.inner(h)


class Net(torch.nn.Module):
    """A user's model: a stem, four repeated Blocks in a ModuleList, a head."""

    def __init__(self, width: int = 32, depth: int = 4):
        super().__init__()
        self.stem, self.head = torch.nn.Linear(8, width), torch.nn.Linear(width, 3)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def net(**kwargs) -> Net:
    """The same initial weights every call (the model's initialisation is the script's)."""
    torch.manual_seed(0)
    return Net(**kwargs)


def rows(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_the_repeated_blocks_of_any_model_are_found():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32,
                                                                n_positions=16))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=2, hidden_size=16,
                                                                num_attention_heads=2, intermediate_size=32,
                                                                vocab_size=32, max_position_embeddings=16))
    assert repeated_blocks(gpt2) == ["GPT2Block"] and repeated_blocks(bert) == ["BertLayer"]
    assert repeated_blocks(Net()) == ["Block"]  # the outermost repeat, not the Linears inside each Block
    assert repeated_blocks(torch.nn.Linear(2, 2)) == []
    with_head = Net()
    with_head.head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    assert repeated_blocks(with_head) == ["Block"]  # bare layers repeated in a Sequential are not blocks


def test_memory_auto_plans_on_a_users_model_records_the_choice_and_a_resume_never_plans_again(tmp_path, capsys):
    """The planner measures the user's Net with its Blocks checkpointed or not; the choice is written into the
    run's config and a Python resume of the same script takes it from there (no second plan: the trajectory
    would otherwise be refused as changed)."""
    cfg = small_config("memory.auto=true", "memory.budget=1GiB", "train.steps=6", "train.batch_size=16",
                       "train.checkpoint_every=3")
    straight = Trainer(net(), rows(), config=cfg, out_dir=tmp_path / "straight")
    assert straight.cfg.memory.auto is False and "planning: chose" in capsys.readouterr().err
    chosen = straight.cfg
    assert chosen.memory.modules in ([], ["Block"]) and chosen.precision in ("fp32", "bf16", "fp16")
    end = straight.fit()
    first = Trainer(net(), rows(), config=cfg, out_dir=tmp_path / "run")
    first.fit(max_steps=3)
    capsys.readouterr()
    again = Trainer(net(), rows(), config=cfg, out_dir=tmp_path / "run")  # the script run again: no planning
    assert "planning" not in capsys.readouterr().err
    assert again.cfg.to_dict() == first.cfg.to_dict()
    resumed = again.fit(resume=True)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    if first.cfg == chosen:  # the same plan (trial timings may pick another among near-equal settings)
        assert resumed["params_sha256"] == end["params_sha256"]
    else:  # then the resumed run matches its own straight run
        assert resumed["params_sha256"] == Trainer(net(), rows(), config=first.cfg).fit()["params_sha256"]


def test_the_planner_checkpoints_a_users_blocks_under_a_tight_budget():
    """A budget below the unchekpointed footprint of every precision: the chosen row names the Block class and
    its measured footprint fits."""
    cfg = small_config("train.batch_size=64")
    model = Net(width=256, depth=6)
    batch = next(iter(torch.utils.data.DataLoader(rows(64), batch_size=64)))
    rows_all, _ = measure(model, batch, cfg, 64, budget=10**12, trial_steps=1, precisions=("fp32",))
    plain = min(r["memory_bytes"] for r in rows_all if r["checkpoint"] == "none")
    checkpointed = min(r["memory_bytes"] for r in rows_all if r["checkpoint"] == "Block")
    assert checkpointed < plain
    table, best = measure(model, batch, cfg, 64, budget=(plain + checkpointed) // 2, trial_steps=1,
                          precisions=("fp32",))
    limit = (plain + checkpointed) // 2
    assert all(r["fits"] == (r["memory_bytes"] <= limit) for r in table)
    assert best == max((r for r in table if r["fits"]), key=lambda r: r["samples_per_s"])
    assert not any(r["fits"] for r in table if r["checkpoint"] == "none" and r["accumulate"] == 1)
    assert apply_choice(cfg, {**best, "checkpoint": "Block"}).memory.modules == ["Block"]


def test_a_model_and_loss_that_do_not_fit_fail_in_one_line_before_any_trial(tmp_path):
    cfg = small_config("memory.auto=true", "memory.budget=1GiB", "train.steps=2")
    with pytest.raises(BatchError, match="the model's forward failed on the first batch"):
        Trainer(torch.nn.Linear(5, 3), rows(), config=cfg, out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_optimizer_and_scheduler_factories(tmp_path):
    """Trainer and Trainer.from_config take `optimizer(model)` and `scheduler(optimizer)`: the same run as the
    instances built by hand."""
    cfg = small_config("train.steps=5")

    def optimizer(model):
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def scheduler(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    by_factory = Trainer(net(), rows(), config=cfg, optimizer=optimizer, scheduler=scheduler).fit()
    model = net()
    opt = optimizer(model)
    by_hand = Trainer(model, rows(), config=cfg, optimizer=opt, scheduler=scheduler(opt)).fit()
    assert by_factory["params_sha256"] == by_hand["params_sha256"]
    built = Trainer.from_config(small_config("train.steps=3"), optimizer=optimizer, scheduler=scheduler)
    assert isinstance(built.engine.optimizer, torch.optim.SGD)
    assert isinstance(built.engine.scheduler, torch.optim.lr_scheduler.StepLR)
    built.fit()


def test_gradwise_plan_on_a_users_model_and_data():
    """`gradwise.plan(model, data, budget=...)`: the table over the model's own Blocks, the choice, the config
    to train with; a mismatched loss is the first-batch check's one line."""
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gradwise.plan(model, rows(), budget="1GiB", config=small_config("train.batch_size=16"),
                           trial_steps=1, precisions=("fp32", "bf16"))
    assert {r["checkpoint"] for r in result.rows} == {"none", "Block"}
    assert result.best == max((r for r in result.rows if r["fits"]), key=lambda r: r["samples_per_s"])
    assert result.config.memory.auto is False and result.config.precision == result.best["precision"]
    assert "**best**" in result.table()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # trials trained copies
    with pytest.raises(BatchError, match="the loss failed on the first batch"):
        gradwise.plan(model, rows(), budget="1GiB", loss_fn=lambda out, y: out.sum(dim=5), trial_steps=1)


def test_a_recorded_plan_is_taken_only_from_gradwise_s_own_run_of_this_model(tmp_path):
    """A config.yaml someone else wrote, or a run of another model or batch size, is not this run's plan."""
    from gradwise.config import flatten
    from gradwise.resolve import PLANNED_KEYS
    from gradwise.train.planning import recorded_plan

    cfg = small_config("memory.auto=true", "memory.budget=1GiB", "train.steps=2", "train.batch_size=16")
    run = Trainer(net(), rows(), config=cfg, out_dir=tmp_path / "run")
    run.fit()
    mine, chosen = flatten(recorded_plan(cfg, tmp_path / "run", net()).to_dict()), flatten(run.cfg.to_dict())
    assert all(mine[key] == chosen[key] for key in PLANNED_KEYS) and mine["memory.auto"] is False
    assert recorded_plan(cfg, tmp_path / "run", torch.nn.Linear(8, 3)) is None  # another model class
    assert recorded_plan(small_config("memory.auto=true", "memory.budget=1GiB", "train.batch_size=32"),
                         tmp_path / "run", net()) is None  # another batch size
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_bytes(b"memory: {auto: false, budget: 1GiB}\n\xff\xfe")
    assert recorded_plan(cfg, foreign, net()) is None


def test_a_class_or_a_bad_factory_for_the_optimizer_is_one_line():
    with pytest.raises(ArgumentTypeError, match="optimizer=SGD is a class"):
        Trainer(net(), rows(), config=small_config(), optimizer=torch.optim.SGD)
    with pytest.raises(ArgumentTypeError, match="the optimizer factory <lambda> returned NoneType"):
        Trainer(net(), rows(), config=small_config(), optimizer=lambda model: None)
    with pytest.raises(ArgumentValueError, match="optimizer=ReLU failed when called with the model"):
        Trainer(net(), rows(), config=small_config(), optimizer=torch.nn.ReLU())  # fuzz seed 3: a raw TypeError
