"""Your data pipeline as you have it: collate functions (dynamic padding, random masking), your own DataLoader,
dataset-level metrics and early stopping on them, one seed for every random draw, evaluation apart from the
training streams, and faults that leave the run resumable."""

from __future__ import annotations

import copy
import json
import multiprocessing
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler,
                              TensorDataset, WeightedRandomSampler)

from conftest import relative_gap, small_config
from metric_objects import MacroF1, RowsSeen
from gradwise import Trainer, load_config
from gradwise.errors import ConfigError, DataError
from gradwise.resolve import resolve_config
from gradwise.train.pipeline import adopt_settings, as_pipeline
from gradwise.train.checks import BatchError

VOCAB, PAD, MASK = 32, 0, 31  # tokens 1..30


class Sentences(Dataset):
    """Variable-length token sequences (3 to 12 tokens) with a class label (2/3 of them class 0)."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 13, (n,), generator=g)
        self.ids = [torch.randint(1, MASK, (int(k),), generator=g) for k in lengths]
        self.labels = [int(s[0] % 6) // 2 if s[0] % 6 >= 4 else 0 for s in self.ids]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "label": self.labels[i]}


def pad(items):
    """Dynamic padding to the batch's longest sequence: input_ids, attention_mask, and labels -100 on padding."""
    ids = pad_sequence([it["input_ids"] for it in items], batch_first=True, padding_value=PAD)
    mask = pad_sequence([torch.ones_like(it["input_ids"]) for it in items], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def mask_tokens(items):
    """A random masking collator (as transformers' DataCollatorForLanguageModeling): 30% of the real tokens,
    drawn from torch's global RNG, become MASK and carry the loss; Python's RNG picks a keep rate too."""
    batch = pad(items)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    chosen = (torch.rand(ids.shape) < 0.3) & (mask == 1)
    keep = random.random() < 0.2
    return {"input_ids": ids if keep else ids.masked_fill(chosen, MASK), "attention_mask": mask,
            "labels": ids.masked_fill(~chosen, -100)}


def pad_classes(items):
    batch = pad(items)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([it["label"] for it in items])}


class TokenModel(nn.Module):
    """Per-token logits: a padded position changes no other position."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.embed, self.drop, self.head = nn.Embedding(VOCAB, 16), nn.Dropout(dropout), nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.head(self.drop(self.embed(input_ids)))


class Classifier(nn.Module):
    """The mean of the real tokens' embeddings -> 3 classes."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.embed, self.drop, self.head = nn.Embedding(VOCAB, 16), nn.Dropout(dropout), nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask, labels=None):
        weights = attention_mask[..., None].float()
        return self.head(self.drop((self.embed(input_ids) * weights).sum(1) / weights.sum(1)))


def token_model(dropout: float = 0.1) -> TokenModel:
    torch.manual_seed(0)
    return TokenModel(dropout)


def config(*extra: str):
    return small_config("train.batch_size=16", "train.steps=20", "optim.lr=0.01", "diagnostics.every=0", *extra)


# -- collate functions ---------------------------------------------------------------------------------------


def test_dynamic_padding_accumulates_token_exactly():
    """4 micro-batches of a padded batch = the batch, because items are counted after collation (real tokens);
    weighting micro-batches by rows instead is measurably different, so the test can tell."""
    model = token_model(dropout=0.0)

    def one_update(*extra, **kwargs):
        cfg = config("train.batch_size=24", "train.steps=1", "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0",
                     "schedule.name=constant", *extra)
        trainer = Trainer(copy.deepcopy(model), Sentences(48), collate_fn=pad, config=cfg, **kwargs)
        trainer.fit()
        return trainer.model

    whole = one_update()
    assert relative_gap(one_update("train.accumulate=4"), whole) < 1e-6
    by_rows = one_update("train.accumulate=4", count_fn=lambda batch: torch.tensor(len(batch["input_ids"])))
    assert relative_gap(by_rows, whole) > 1e-4


@pytest.mark.parametrize("workers", [0, 2])
def test_a_random_collator_resumes_exactly(tmp_path, workers):
    """Masking drawn in the collator (in the training process, or in 2 loader workers) and dropout:
    10 + 10 steps give the weights of 20 straight, and the workers draw what the training process would."""
    cfg = config("train.checkpoint_every=5", f"loader.num_workers={workers}")

    def run(out=None, **fit):
        trainer = Trainer(token_model(), Sentences(64), collate_fn=mask_tokens, config=cfg, out_dir=out)
        return trainer.fit(**fit)

    straight = run()
    run(tmp_path / "run", max_steps=10)
    resumed = run(tmp_path / "run", resume=True)
    assert resumed["resumed_from"] == 10 and resumed["params_sha256"] == straight["params_sha256"]
    if workers:
        in_process = Trainer(token_model(), Sentences(64), collate_fn=mask_tokens, config=config()).fit()
        assert straight["params_sha256"] == in_process["params_sha256"]


class TokenStream(IterableDataset):
    """Sentences as a stream (the same order each pass; split across loader workers), replayed on resume."""

    def __init__(self, n: int = 96):
        self.items = Sentences(n)
        self.cursor = 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rows = range(len(self.items)) if info is None else range(info.id, len(self.items), info.num_workers)
        while self.cursor < len(rows):
            self.cursor += 1
            yield self.items[rows[self.cursor - 1]]
        self.cursor = 0


class StatefulTokenStream(TokenStream):
    """The same stream with its own position, restored in each worker."""

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


@pytest.mark.parametrize("workers, stateful", [(0, True), (2, True), (2, False)])
def test_a_stream_with_a_random_collator_resumes_exactly(tmp_path, workers, stateful):
    """Stopped early in the second pass (6 batches a pass; no worker has ended its share yet): torchdata's
    loader restores a worker whose share ended mid-pass from its start)."""
    cfg = config("train.steps=14", "train.checkpoint_every=8", f"loader.num_workers={workers}")

    def run(out=None, **fit):
        stream = StatefulTokenStream() if stateful else TokenStream()
        return Trainer(token_model(), stream, collate_fn=mask_tokens, config=cfg, out_dir=out).fit(**fit)

    straight = run()
    run(tmp_path / "run", max_steps=8)
    assert run(tmp_path / "run", resume=True)["params_sha256"] == straight["params_sha256"]


# -- your own DataLoader --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13
def test_a_users_dataloader_is_adopted(capsys):
    """Its dataset, collate_fn, batch size and workers are used, its sampler replaced by gradwise's order (one
    info line): the same weights as passing the dataset and collate_fn, with torch's and torchdata's loader."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = DataLoader(Sentences(64), batch_size=16, shuffle=True, collate_fn=pad)
    test = DataLoader(Sentences(20, seed=1), batch_size=5, collate_fn=pad)
    trainer = Trainer(token_model(), loader, test_data=test, config=config("train.steps=8", "log.progress=plain"))
    err = capsys.readouterr().err
    assert "train_data is a DataLoader" in err and "RandomSampler replaced by gradwise's seeded" in err
    assert trainer.cfg.train.batch_size == 16
    adopted = trainer.fit()
    reference = Trainer(token_model(), Sentences(64), test_data=Sentences(20, seed=1), collate_fn=pad,
                        config=config("train.steps=8", "train.eval_batch_size=5")).fit()
    assert adopted["params_sha256"] == reference["params_sha256"]
    assert adopted["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-12)
    stateful = StatefulDataLoader(Sentences(64), batch_size=16, collate_fn=pad, num_workers=2)
    trainer = Trainer(token_model(), stateful, test_data=test, config=config("train.steps=8"))
    assert trainer.cfg.loader.num_workers == 2 and trainer.fit()["params_sha256"] == reference["params_sha256"]


data = Sentences(64)
REFUSED = [
    ("batch sampler", lambda: DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 8, False)), [],
     {}, "a batch_sampler of its own"),
    ("whole batches", lambda: DataLoader(data, batch_size=None), [], {}, "batch_size=None"),
    ("weighted", lambda: DataLoader(data, batch_size=16, sampler=WeightedRandomSampler([1.0] * 64, 64)), [], {},
     "the sampler WeightedRandomSampler"),
    ("batch size", lambda: DataLoader(data, batch_size=8), ["train.batch_size=16"], {},
     "batch_size=8, but the config gives train.batch_size=16"),
    ("drop_last", lambda: DataLoader(data, batch_size=16, drop_last=True), ["train.drop_last=false"], {},
     "drop_last=True, but the config gives train.drop_last=False"),
    ("two collates", lambda: DataLoader(data, batch_size=16, collate_fn=pad), [], {"collate_fn": mask_tokens},
     "collate_fn of its own"),
    ("with replacement", lambda: DataLoader(data, batch_size=16, sampler=RandomSampler(data, replacement=True)), [],
     {}, "RandomSampler drawing with replacement"),
    ("resolved config", lambda: DataLoader(data, batch_size=8), ["resolved"], {},  # its default batch size is fixed
     "batch_size=8, but the config gives train.batch_size=128"),
]


@pytest.mark.parametrize("make, overrides, kwargs, message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_a_dataloader_asks_that_cannot_be_honoured_is_refused_in_one_line(make, overrides, kwargs, message):
    cfg = resolve_config(load_config(None, ["log.progress=off"]), 64) if overrides == ["resolved"] \
        else config(*overrides)
    with pytest.raises(DataError) as err:  # at construction, before a run folder could be written
        Trainer(token_model(), make(), config=cfg, **{"collate_fn": pad, **kwargs})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_adoption_takes_what_the_dataloader_sets_per_process_and_only_that():
    """A DataLoader's batch_size is per process (as in torch, Lightning, Accelerate): under 2 processes the run's
    global batch is twice it. torch's defaults (0 workers, no pinning) leave the config's own settings alone;
    torchdata's samplers are replaced like torch's."""
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    cfg = config("loader.num_workers=2")
    pipeline = as_pipeline(DataLoader(data, batch_size=16, collate_fn=pad), "train_data")
    assert adopt_settings(cfg, pipeline).loader.num_workers == 2
    spread = as_pipeline(DataLoader(data, batch_size=8, sampler=StatefulDistributedSampler(data, 2, 0)), "train_data")
    assert adopt_settings(load_config(None, []), spread, world_size=2).train.batch_size == 16
    with pytest.raises(DataError, match=r"batch_size=16 \(8 per process x 2\), but the config gives train.batch_"):
        adopt_settings(config("train.batch_size=8"), spread, world_size=2)


class Shards(Dataset):
    """Items read from a per-worker handle that the DataLoader's worker_init_fn opens (as with an HDF5 file)."""

    def __init__(self):
        self.items, self.handle = Sentences(64), None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        assert self.handle == "open", "worker_init_fn did not run on this dataset"
        return self.items[i]


def open_handle(worker_id):
    torch.utils.data.get_worker_info().dataset.handle = "open"


def test_an_adopted_worker_init_fn_sets_up_the_users_dataset_in_each_worker():
    loader = DataLoader(Shards(), batch_size=16, collate_fn=pad, num_workers=2, worker_init_fn=open_handle)
    dataset = Shards()
    dataset.handle = "open"  # in-process reading: the reference
    reference = Trainer(token_model(), dataset, collate_fn=pad, config=config("train.steps=6")).fit()
    assert Trainer(token_model(), loader, config=config("train.steps=6")).fit()["params_sha256"] == \
        reference["params_sha256"]


def split_stream(worker_id):
    info = torch.utils.data.get_worker_info()
    info.dataset.share = (info.id, info.num_workers)


class SplitStream(IterableDataset):
    """A stream that its DataLoader's worker_init_fn splits between the workers (HF datasets' way)."""

    def __init__(self, n: int):
        self.items, self.share = Sentences(n), (0, 1)

    def __iter__(self):
        first, step = self.share
        return (self.items[i] for i in range(first, len(self.items), step))


def test_a_streaming_dataloader_is_adopted_with_its_hooks_for_training_and_evaluation():
    """Its worker_init_fn reaches evaluation too: otherwise each worker would score the whole stream and
    every evaluation row would count twice."""
    rows = {"rows": RowsSeen()}
    split = dict(batch_size=16, collate_fn=pad_classes, num_workers=2, worker_init_fn=split_stream)
    torch.manual_seed(0)
    trainer = Trainer(Classifier(), DataLoader(SplitStream(64), **split),
                      test_data=DataLoader(SplitStream(40), **split), config=config("train.steps=6"), metrics=rows)
    assert trainer.cfg.loader.num_workers == 2 and trainer.fit()["test_rows"] == 40


# -- one seed for every draw; evaluation apart ----------------------------------------------------------------


def test_the_seed_governs_every_draw_whatever_ran_before_fit():
    model = token_model()
    runs = []
    for ambient in (1, 2):
        torch.manual_seed(ambient), random.seed(ambient), np.random.seed(ambient)
        trainer = Trainer(copy.deepcopy(model), Sentences(64), collate_fn=mask_tokens, config=config("seed=7"))
        runs.append(trainer.fit()["params_sha256"])
    assert runs[0] == runs[1]
    other = Trainer(copy.deepcopy(model), Sentences(64), collate_fn=mask_tokens, config=config("seed=8")).fit()
    assert other["params_sha256"] != runs[0]


def test_evaluation_never_moves_the_training_streams(tmp_path):
    """A random evaluation collator (masking a validation set and a streaming test set, as transformers does)
    and dropout: how often the run evaluates, an extra evaluation, pausing and resuming change nothing in
    training, bit for bit."""

    def trainer(*extra, out=None):
        return Trainer(token_model(), Sentences(64), val_data=Sentences(24, seed=1), test_data=TokenStream(24),
                       collate_fn=mask_tokens, config=config("train.steps=12", "train.checkpoint_every=6", *extra),
                       out_dir=out)

    often = trainer("train.eval_every=4").fit()
    assert trainer("train.eval_every=12").fit()["params_sha256"] == often["params_sha256"]
    paused = trainer("train.eval_every=4", out=tmp_path / "run")
    paused.fit(max_steps=6)
    first, again = paused.evaluate_all(), paused.evaluate_all()
    assert first == again  # every evaluation draws the same masks
    torch.rand(100), random.random()  # whatever the script does in between
    assert paused.fit()["params_sha256"] == often["params_sha256"]
    trainer("train.eval_every=4", out=tmp_path / "resumed").fit(max_steps=6)
    resumed = trainer("train.eval_every=4", out=tmp_path / "resumed").fit(resume=True)
    assert resumed["params_sha256"] == often["params_sha256"]
    assert resumed["test_loss"] == often["test_loss"]


# -- dataset-level metrics --------------------------------------------------------------------------------------


def batch_f1(output, target):
    return f1_score(target["labels"].cpu(), output.argmax(-1).cpu(), average="macro")


def classifier_run(*extra, metrics=None, **kwargs):
    torch.manual_seed(0)
    return Trainer(Classifier(), Sentences(96), test_data=Sentences(50, seed=1), collate_fn=pad_classes,
                   config=config("train.steps=10", "train.eval_batch_size=8", *extra), metrics=metrics, **kwargs)


def whole_set_f1(trainer) -> float:
    test = Sentences(50, seed=1)
    batch = pad_classes([test[i] for i in range(len(test))])
    trainer.model.eval()
    with torch.no_grad():
        preds = trainer.model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
    return f1_score(batch["labels"], preds, average="macro")


def test_a_dataset_level_metric_is_computed_over_the_whole_set():
    from torchmetrics.classification import MulticlassF1Score

    metrics = {"f1": MacroF1(), "f1_per_batch": batch_f1, "tm_f1": MulticlassF1Score(num_classes=3, average="macro")}
    trainer = classifier_run(metrics=metrics)
    summary = trainer.fit()
    whole = whole_set_f1(trainer)
    assert summary["test_f1"] == pytest.approx(whole, abs=1e-12)
    assert summary["test_tm_f1"] == pytest.approx(whole, abs=1e-6)
    assert abs(summary["test_f1_per_batch"] - whole) > 1e-3  # a per-batch mean of F1 is not the set's F1


def test_early_stopping_and_the_best_weights_on_a_metric_of_ones_own():
    trainer = classifier_run("train.steps=200", "train.eval_every=5", "optim.lr=0.05", "early_stopping.patience=3",
                             "early_stopping.metric=val_f1", metrics={"f1": MacroF1()},
                             val_data=Sentences(40, seed=2))
    es = trainer.fit()["early_stopping"]
    assert es["metric"] == "val_f1" and es["stopped_at"] is not None and es["stopped_at"] < 200
    best = trainer.evaluate(trainer.val_data, prefix="val")["val_f1"]
    assert best == pytest.approx(es["best_value"], abs=1e-12)  # the restored weights are the best evaluation's
    records = [r for r in trainer.records if r["kind"] == "eval" and "restored_from_step" not in r]
    assert es["best_value"] == max(r["val_f1"] for r in records)  # higher is better: from the metric object


@pytest.mark.parametrize("metric, mode, message", [
    ("val_nope", None, "early_stopping.metric=val_nope is not reported for this run"),
    ("val_f1_per_batch", None, "needs early_stopping.mode=max (higher is better) or min"),
])
def test_early_stopping_on_a_metric_that_cannot_be_judged_is_refused(metric, mode, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        classifier_run("early_stopping.patience=2", f"early_stopping.metric={metric}",
                       metrics={"f1_per_batch": batch_f1}, val_data=Sentences(40, seed=2))


def test_each_parameter_groups_lr_is_recorded(tmp_path):
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 1e-4, "name": "backbone"},
                                 {"params": model[2].parameters(), "lr": 1e-3, "name": "head"}])
    data = TensorDataset(torch.randn(64, 5), torch.randint(0, 2, (64,)))
    Trainer(model, data, optimizer=optimizer, out_dir=tmp_path / "run",
            config=config("train.steps=4", "log.every=2", "schedule.name=constant")).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all(r["lr/backbone"] == 1e-4 and r["lr/head"] == 1e-3 for r in train)


# -- faults ----------------------------------------------------------------------------------------------------


class Damaged(Sentences):
    """Sentences whose item 5 cannot be read while `broken` is set (a class flag: forked workers see it)."""

    broken = False

    def __getitem__(self, i):
        if Damaged.broken and i == 5:
            raise ValueError("item 5 is damaged")
        return super().__getitem__(i)


def test_a_loader_worker_error_leaves_the_run_resumable_in_the_same_process(tmp_path):
    """A worker's error is one line naming the step and the batch; the workers are shut down and the lock
    released although the error is still referenced (a notebook keeps it), so fit(resume=True) in the same
    process continues from the last checkpoint to the weights of a straight run."""
    cfg = config("train.steps=12", "train.checkpoint_every=4", "loader.num_workers=2")

    def trainer():
        return Trainer(token_model(), Damaged(64), collate_fn=mask_tokens, config=cfg, out_dir=tmp_path / "run")

    straight = Trainer(token_model(), Damaged(64), collate_fn=mask_tokens, config=cfg).fit()
    trainer().fit(max_steps=4)
    Damaged.broken = True
    try:
        with pytest.raises(BatchError) as kept:
            trainer().fit(resume=True)
    finally:
        Damaged.broken = False
    message = str(kept.value)
    assert "\n" not in message and "reading the batch failed at step" in message
    assert "(data position: epoch 1, batch" in message
    assert "ValueError in DataLoader worker process" in message and "item 5 is damaged" in message
    assert multiprocessing.active_children() == []
    resumed = trainer().fit(resume=True)
    assert resumed["resumed_from"] == 4 and resumed["params_sha256"] == straight["params_sha256"]


def test_a_later_batch_that_does_not_fit_is_one_line_naming_step_position_and_structure(tmp_path):
    x = torch.randn(64, 5)
    x_wide = torch.randn(64, 6)

    class Widening(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return (x_wide if Widening.wide else x)[i], i % 2

    torch.manual_seed(0)
    model = nn.Linear(5, 2)

    def trainer(out=None):
        return Trainer(copy.deepcopy(model), Widening(), config=config("train.steps=6", "train.checkpoint_every=2"),
                       out_dir=out)

    Widening.wide = False
    straight = trainer().fit()
    failing = trainer(tmp_path / "run")
    failing.fit(max_steps=2)
    Widening.wide = True
    with pytest.raises(BatchError) as err:
        failing.fit()
    assert str(err.value).startswith("batch error: the training step failed at step 3 (data position: epoch 0, "
                                     "batch 2 of 4), list(float32[16, 6], int64[16]): RuntimeError: mat1 and mat2")
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    # the same trainer goes back to its last checkpoint, the failed batch included, once the data is mended
    Widening.wide = False
    resumed = failing.fit(resume=True)
    assert resumed["resumed_from"] == 2 and resumed["params_sha256"] == straight["params_sha256"]
