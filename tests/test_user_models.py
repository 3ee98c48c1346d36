"""Your own model and data with no glue: batches of any structure, Hugging Face models, honest metrics,
the first-batch check, and `fit(resume=True)`."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from conftest import relative_gap, small_config
from gradwise import Trainer
from gradwise.memory.accumulation import item_count
from gradwise.train.checks import BatchError
from gradwise.checkpoint.format import params_sha256


def one_sgd_step(model, data, *extra, **kwargs):
    """Parameters after one SGD update on the first batch of 24 (a copy of `model` is trained)."""
    cfg = small_config("train.batch_size=24", "train.steps=1", "optim.name=sgd", "optim.lr=0.5",
                       "optim.momentum=0", "schedule.name=constant", "diagnostics.every=0", *extra)
    trainer = Trainer(copy.deepcopy(model), data, config=cfg, **kwargs)
    trainer.fit()
    return trainer.model


class DictSamples(Dataset):
    """Samples {"x_num": float[4], "x_seq": int[6], "labels": int}: a two-input tabular + sequence model's data."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x_num = torch.randn(n, 4, generator=g)
        self.x_seq = torch.randint(0, 10, (n, 6), generator=g)
        self.labels = ((self.x_num[:, 0] > 0).long() + (self.x_seq[:, 0] > 4).long())

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x_num": self.x_num[i], "x_seq": self.x_seq[i], "labels": self.labels[i]}


class TwoInputModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(4 + 8, 3)

    def forward(self, x_num, x_seq, labels=None):
        return self.head(torch.cat([x_num, self.embed(x_seq).mean(1)], dim=-1))


def test_a_dict_batch_calls_model_with_keywords_and_reports_accuracy():
    torch.manual_seed(0)
    trainer = Trainer(TwoInputModel(), DictSamples(200), test_data=DictSamples(60, seed=1),
                      config=small_config("train.steps=30", "train.batch_size=32"))
    assert trainer.task == "classification"  # inferred: (B, C) logits and (B,) integer labels
    summary = trainer.fit()
    assert 0.0 < summary["test_accuracy"] <= 1.0 and summary["test_loss"] > 0


@pytest.mark.parametrize("split", [["train.accumulate=4"], ["train.micro_batch_size=7"]])
def test_a_dict_batch_accumulates_exactly(split):
    torch.manual_seed(0)
    model, data = TwoInputModel(), DictSamples(48)
    assert relative_gap(one_sgd_step(model, data, *split), one_sgd_step(model, data)) < 1e-6


class PairOfInputs(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(3)
        self.a, self.b = torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)
        self.y = (self.a[:, 0] + self.b[:, 0] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.a[i], self.b[i]), self.y[i]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, a, b):
        return self.fc(torch.cat([a, b], dim=-1))


def test_a_tuple_of_inputs_is_unpacked():
    torch.manual_seed(0)
    summary = Trainer(Concat(), PairOfInputs(64), test_data=PairOfInputs(16),
                      config=small_config("train.steps=5", "train.batch_size=16")).fit()
    assert "test_accuracy" in summary


def weighted_loss(output, target):
    y, w = target
    return (F.cross_entropy(output, y, reduction="none") * w).sum() / w.sum()


def test_per_sample_weights_accumulate_exactly_with_their_count():
    g = torch.Generator().manual_seed(5)
    x, y, w = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g), torch.rand(48, generator=g)

    class Weighted(Dataset):
        def __len__(self):
            return 48

        def __getitem__(self, i):
            return x[i], (y[i], w[i])

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    kw = {"loss_fn": weighted_loss, "count_fn": lambda target: target[1].sum()}
    accumulated = one_sgd_step(model, Weighted(), "train.accumulate=3", **kw)
    assert relative_gap(accumulated, one_sgd_step(model, Weighted(), **kw)) < 1e-6
    # counting samples instead of weight mass is not exact here: the test can tell the difference
    wrong = one_sgd_step(model, Weighted(), "train.accumulate=3", loss_fn=weighted_loss)
    assert relative_gap(wrong, one_sgd_step(model, Weighted(), **kw)) > 1e-4


def test_accuracy_is_left_out_where_it_is_not_defined():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), (torch.rand(64, 3, generator=g) > 0.5).float()  # multi-label
    summary = Trainer(nn.Linear(5, 3), TensorDataset(x, y), test_data=TensorDataset(x[:16], y[:16]),
                      loss_fn=F.binary_cross_entropy_with_logits, task="classification",
                      config=small_config("train.steps=3", "train.batch_size=16")).fit()
    assert "test_loss" in summary and "test_accuracy" not in summary


def test_a_bad_combination_fails_in_one_line_before_anything_is_written(tmp_path):
    class NoLabels(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x_num": torch.randn(4), "x_seq": torch.zeros(6, dtype=torch.long)}

    with pytest.raises(BatchError) as err:
        Trainer(TwoInputModel(), NoLabels(), config=small_config(), out_dir=tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and "the loss failed on the first batch" in message
    assert "dict(x_num: float32[2, 4], x_seq: int64[2, 6])" in message
    assert not (tmp_path / "run").exists()
    with pytest.raises(BatchError, match="the model's forward failed"):
        Trainer(nn.Linear(3, 2), TensorDataset(torch.randn(8, 5), torch.zeros(8, dtype=torch.long)),
                config=small_config())


# -- a Hugging Face causal LM built from a config (random weights, nothing downloaded) -------------------------

transformers = pytest.importorskip("transformers")


class Tokens(Dataset):
    """Random token sequences as {"input_ids", "labels"}; `pad` > 0 masks a varying tail of labels with -100."""

    def __init__(self, n: int, length: int = 16, pad: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, length), generator=g)
        self.labels = self.ids.clone()
        if pad:
            for i in range(n):
                cut = length - int(torch.randint(0, pad + 1, (1,), generator=g))
                self.labels[i, cut:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def gpt2(seed: int = 0, dropout: float = 0.1):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                                     attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config)


def test_hf_gpt2_trains_with_no_loss_fn_and_no_task():
    trainer = Trainer(gpt2(), Tokens(64), test_data=Tokens(16, seed=1),
                      config=small_config("train.steps=10", "train.batch_size=8", "optim.lr=0.003"))
    assert trainer.task == "language_model"
    summary = trainer.fit()
    assert "test_bpc" in summary and summary["test_bpc"] == pytest.approx(summary["test_loss"] / 0.6931, rel=1e-3)


@pytest.mark.parametrize("pad", [0, 6], ids=["full", "padded"])
def test_hf_gpt2_accumulation_equals_one_batch(pad):
    model, data = gpt2(dropout=0.0), Tokens(24, pad=pad)  # no dropout: both runs compute the same function
    one = one_sgd_step(model, data)
    for split in (["train.accumulate=4"], ["train.micro_batch_size=5"]):
        assert relative_gap(one_sgd_step(model, data, *split), one) < 1e-6, split
    if pad:  # GPT-2 shifts its labels: counting every position instead of 1.. would weight micro-batches wrongly
        unshifted = {"count_fn": item_count}
        gap = relative_gap(one_sgd_step(model, data, "train.accumulate=4", **unshifted),
                           one_sgd_step(model, data, **unshifted))
        assert gap > 1e-5


def test_hf_gpt2_block_checkpointing_gives_identical_parameters():
    data = Tokens(32)
    plain = Trainer(gpt2(), data, config=small_config("train.steps=3", "train.batch_size=8"))
    plain.fit()
    checkpointed = Trainer(gpt2(), data, config=small_config("train.steps=3", "train.batch_size=8",
                                                             "memory.modules=[GPT2Block]"))
    checkpointed.fit()
    assert params_sha256(plain.model) == params_sha256(checkpointed.model)


def test_hf_gpt2_trains_in_bf16():
    summary = Trainer(gpt2(), Tokens(64), test_data=Tokens(16, seed=1),
                      config=small_config("train.steps=20", "train.batch_size=8", "optim.lr=0.003",
                                          "precision=bf16", "log.every=5")).fit()
    assert summary["final_train_loss"] < 4.15  # ln 64 = 4.16 at the start


def test_hf_gpt2_fit_resume_continues_exactly(tmp_path):
    cfg = small_config("train.steps=40", "train.batch_size=8", "train.checkpoint_every=10", "optim.lr=0.003")
    straight = Trainer(gpt2(), Tokens(64), config=cfg, out_dir=tmp_path / "straight").fit()
    first = Trainer(gpt2(), Tokens(64), config=cfg, out_dir=tmp_path / "run")
    first.fit(max_steps=20)  # then the process "stops"; a new one builds the same script's trainer
    again = Trainer(gpt2(), Tokens(64), config=cfg, out_dir=tmp_path / "run")
    summary = again.fit(resume=True)
    assert summary["resumed_from"] == 20 and summary["steps"] == 40
    assert summary["params_sha256"] == straight["params_sha256"]


@pytest.mark.parametrize("script, args, expect", [
    ("dict_model.py", ["--steps", "30"], "test accuracy"),
    ("hf_causal_lm.py", ["--steps", "10"], "bits per byte"),
    ("streaming.py", ["--steps", "20", "--workers", "2"], "test accuracy"),
    ("hf_masked_lm.py", ["--steps", "20", "--workers", "2"], "test loss"),
    ("hf_text_classification.py", ["--steps", "50"], "test macro-F1"),
])
def test_the_examples_run(script, args, expect, tmp_path, monkeypatch, capsys):
    """`python examples/SCRIPT ARGS` (run in this process: no interpreter start-up to pay)."""
    from pathlib import Path

    from launching import run_script

    monkeypatch.chdir(tmp_path)
    run_script(Path(__file__).resolve().parents[1] / "examples" / script, *args)
    assert expect in capsys.readouterr().out


def code_lines(path) -> int:
    """Lines holding code: no blank line, comment or module docstring."""
    import ast
    import io
    import tokenize

    source = path.read_text()
    first = ast.parse(source).body[0]
    docstring = range(first.lineno, first.end_lineno + 1) if isinstance(first, ast.Expr) else range(0)
    skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    return len({line for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type not in skipped
                for line in range(tok.start[0], tok.end[0] + 1) if line not in docstring})


def test_the_masked_lm_example_takes_no_more_code_than_transformers_trainer():
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    assert code_lines(examples / "hf_masked_lm.py") <= code_lines(examples / "compare" / "mlm_hf_trainer.py")


def test_the_summary_and_report_describe_the_users_model_and_data(tmp_path):
    from gradwise.report import render_report

    torch.manual_seed(0)
    Trainer(TwoInputModel(), DictSamples(64), config=small_config("train.steps=2", "train.batch_size=32"),
            out_dir=tmp_path / "run").fit()
    summary = __import__("json").loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["model_class"], summary["data_class"], summary["train_samples"]) == ("TwoInputModel",
                                                                                           "DictSamples", 64)
    page = render_report(tmp_path / "run")
    assert "TwoInputModel" in page and "DictSamples" in page
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    params = sum(p.numel() for p in TwoInputModel().parameters())
    assert recorded["model"] == {"name": "user", "class": "TwoInputModel", "parameters": params}
    assert recorded["data"] == {"name": "user", "class": "DictSamples", "samples": 64}
    assert "cnn" not in page and "mnist1d" not in page  # nothing of the built-in defaults
    from gradwise.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"trained a model of your own \(TwoInputModel\); continue it from"):
        Trainer.resume(tmp_path / "run")


class Items(Dataset):
    """A map-style dataset read item by item (what a DataLoader's workers call)."""

    def __init__(self, n: int = 300):
        g = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))


def test_loader_workers_give_the_same_run_and_resume_exactly(tmp_path):
    base = ["train.steps=20", "train.batch_size=32", "train.checkpoint_every=5", "optim.lr=0.01"]
    straight = Trainer(dropout_mlp(), Items(), config=small_config(*base), out_dir=tmp_path / "in-process").fit()
    workers = small_config(*base, "loader.num_workers=2")
    first = Trainer(dropout_mlp(), Items(), config=workers, out_dir=tmp_path / "workers")
    first.fit(max_steps=13)  # stop mid-epoch (10 batches per epoch), between checkpoints
    resumed = Trainer(dropout_mlp(), Items(), config=workers, out_dir=tmp_path / "workers").fit(resume=True)
    assert resumed["resumed_from"] == 13 and resumed["steps"] == 20
    assert resumed["params_sha256"] == straight["params_sha256"]


class Stream(torch.utils.data.IterableDataset):
    """A deterministic stream of (x, y): the same items in the same order every pass; split across workers."""

    def __init__(self, n: int = 200):
        g = torch.Generator().manual_seed(11)
        self.x, self.y = torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rows = range(len(self.y)) if info is None else range(info.id, len(self.y), info.num_workers)
        for i in rows:
            yield self.x[i], self.y[i]


def test_a_streaming_dataset_trains_across_passes_and_resumes_exactly(tmp_path):
    base = ["train.steps=25", "train.batch_size=32", "train.checkpoint_every=5", "optim.lr=0.01"]
    straight = Trainer(dropout_mlp(), Stream(), test_data=Stream(64), config=small_config(*base),
                       out_dir=tmp_path / "straight").fit()
    assert straight["epochs"] == 3.0 and "test_accuracy" in straight  # 7 batches a pass: 25 steps end in the 4th
    first = Trainer(dropout_mlp(), Stream(), test_data=Stream(64), config=small_config(*base), out_dir=tmp_path / "s")
    first.fit(max_steps=12)
    resumed = Trainer(dropout_mlp(), Stream(), test_data=Stream(64), config=small_config(*base),
                      out_dir=tmp_path / "s").fit(resume=True)
    assert resumed["params_sha256"] == straight["params_sha256"]
    two = small_config(*base, "loader.num_workers=2")
    workers = Trainer(dropout_mlp(), Stream(), config=two, out_dir=tmp_path / "w").fit()
    assert workers["steps"] == 25 and workers["train_samples"] is None
    Trainer(dropout_mlp(), Stream(), config=two, out_dir=tmp_path / "w2").fit(max_steps=9)  # mid-pass, 2 workers
    resumed = Trainer(dropout_mlp(), Stream(), config=two, out_dir=tmp_path / "w2").fit(resume=True)
    assert resumed["resumed_from"] == 9 and resumed["params_sha256"] == workers["params_sha256"]


class Passes(torch.utils.data.IterableDataset):
    """A stream whose every pass is a new order (a pass counter of its own): replaying a fresh copy of it
    does not give the batches a run had next; only its own state (`state_dict`) does."""

    def __init__(self, n: int = 200):
        g = torch.Generator().manual_seed(11)
        self.x, self.y = torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.passes, self.cursor, self.loads = 0, 0, 0

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(100 + self.passes))
        while self.cursor < len(order):
            i = order[self.cursor]
            self.cursor += 1
            yield self.x[i], self.y[i]
        self.passes, self.cursor = self.passes + 1, 0


class StatefulPasses(Passes):
    def state_dict(self):
        return {"passes": self.passes, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.passes, self.cursor, self.loads = state["passes"], state["cursor"], self.loads + 1


def test_a_stream_with_its_own_state_resumes_from_it(tmp_path):
    base = ["train.steps=20", "train.batch_size=32", "train.checkpoint_every=5", "optim.lr=0.01"]
    straight = Trainer(dropout_mlp(), StatefulPasses(), config=small_config(*base), out_dir=tmp_path / "a").fit()
    Trainer(dropout_mlp(), StatefulPasses(), config=small_config(*base), out_dir=tmp_path / "b").fit(max_steps=11)
    stream = StatefulPasses()
    resumed = Trainer(dropout_mlp(), stream, config=small_config(*base), out_dir=tmp_path / "b").fit(resume=True)
    assert stream.loads == 1 and resumed["params_sha256"] == straight["params_sha256"]
    # the same stream without a state of its own is replayed from a fresh pass counter: a different run
    Trainer(dropout_mlp(), Passes(), config=small_config(*base), out_dir=tmp_path / "c").fit(max_steps=11)
    replayed = Trainer(dropout_mlp(), Passes(), config=small_config(*base), out_dir=tmp_path / "c").fit(resume=True)
    assert replayed["params_sha256"] != straight["params_sha256"]


def test_a_streaming_dataset_needs_train_steps():
    from gradwise.errors import ConfigError

    with pytest.raises(ConfigError, match="train.epochs=2 needs a dataset with a length"):
        Trainer(dropout_mlp(), Stream(), config=small_config("train.epochs=2", "train.steps=null"))


def test_metric_functions_of_your_own_are_reported():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = x[:, :1] * 2.0
    model = nn.Linear(5, 1)
    trainer = Trainer(model, TensorDataset(x, y), test_data=TensorDataset(x, y), loss_fn=F.mse_loss,
                      metrics={"mae": lambda out, target: (out - target).abs().mean()},
                      config=small_config("train.steps=3", "train.batch_size=16", "train.eval_batch_size=10"))
    summary = trainer.fit()
    assert trainer.task == "other" and "test_accuracy" not in summary
    with torch.no_grad():
        expected = float((model(x) - y).abs().mean())  # batches of 10 weighted by their items: the overall mean
    assert summary["test_mae"] == pytest.approx(expected, rel=1e-5)


def test_a_dict_batch_without_labels_counts_what_its_count_fn_says():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48, 4), generator=g)
    y[torch.rand(48, 4, generator=g) < 0.4] = -100  # padded positions

    class Tagged(Dataset):
        def __len__(self):
            return 48

        def __getitem__(self, i):
            return {"x": x[i], "tags": y[i]}

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 12)

        def forward(self, x, tags):
            return self.fc(x).reshape(-1, 4, 3)

    def token_loss(output, batch):
        return F.cross_entropy(output.reshape(-1, 3), batch["tags"].reshape(-1), ignore_index=-100)

    kw = {"loss_fn": token_loss, "count_fn": lambda batch: (batch["tags"] != -100).sum()}
    torch.manual_seed(0)
    model = Tagger()
    assert relative_gap(one_sgd_step(model, Tagged(), "train.accumulate=3", **kw),
                        one_sgd_step(model, Tagged(), **kw)) < 1e-6


def test_fit_resume_without_a_run_directory_just_trains():
    summary = Trainer(nn.Linear(5, 2), TensorDataset(torch.randn(16, 5), torch.zeros(16, dtype=torch.long)),
                      config=small_config("train.steps=2", "train.batch_size=8")).fit(resume=True)
    assert summary["steps"] == 2 and summary["resumed_from"] is None


def test_a_broken_metric_fails_the_first_batch_check():
    data = TensorDataset(torch.randn(16, 5), torch.zeros(16, dtype=torch.long))
    with pytest.raises(BatchError, match=r"evaluation \(test\) failed on the first batch"):
        Trainer(nn.Linear(5, 2), data, test_data=data, metrics={"bad": lambda out, target: out.nonexistent},
                config=small_config("train.steps=2", "train.batch_size=8"))
