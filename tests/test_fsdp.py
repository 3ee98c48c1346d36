"""FSDP (`--strategy fsdp`, fully_shard over gloo on CPU) against one process: a user's model under torchrun,
the optimizers' whole-tensor norms over shards, fp16 overflow agreement, and sharded checkpoints resumed on
another number of processes or after a crash mid-save."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL
from gradwise.cli import main
from gradwise.config import load_config
from gradwise.nn import build_model
from launching import assert_same_weights, in_process, run_script, shards_folder, summary, torchrun, weights


# -- FSDP -----------------------------------------------------------------------------------------------------


def test_a_users_model_under_fsdp_matches_one_process_and_a_nan_on_one_rank_rolls_back_every_rank(tmp_path):
    """A user's model sharded per Linear (train.shard_modules) under torchrun, resumed from a one-process run
    (whole file -> shards) = straight FSDP, health records included (whole-tensor norms); a non-finite output on
    rank 1 alone makes every rank take the same path (diagnosis without collectives, one rollback through the
    sharded checkpoint) instead of hanging. Both resumes start a fresh optimizer, and the spare layer has no
    optimizer state: it must get none from the load either."""
    script = str(Path(__file__).with_name("user_ddp_script.py"))

    def group(out: str, *options: str):
        assert torchrun(script, str(tmp_path / out), "fsdp", *options) == 0

    group("two")
    run_script(Path(script), str(tmp_path / "one-two"), "fsdp", "stop-at-10")
    group("one-two")  # resumed at step 10 on 2 processes
    group("nan", "nan-on-rank-1", "stop-at-10")
    group("nan", "nan-on-rank-1")  # resumed at step 10
    assert summary(tmp_path / "two")["world_size"] == 2 and summary(tmp_path / "one-two")["resumed_from"] == 10
    assert_same_weights(tmp_path / "two", tmp_path / "one-two")
    records = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("two", "one-two", "nan")}

    def health(run: str) -> list[float]:
        return [layer["grad_norm"] for r in records[run] if r["kind"] == "health" for layer in r["per_layer"]]

    assert len(health("two")) == 4 * 3 and health("two") == pytest.approx(health("one-two"), rel=1e-4)  # 3 Linear
    assert [r["step"] for r in records["nan"] if r["kind"] == "rollback"] == [5]
    assert summary(tmp_path / "nan")["steps"] == 20 and summary(tmp_path / "nan")["resumed_from"] == 10


def relative_differences(a: dict, b: dict) -> dict[str, float]:
    out = {}
    for run in b:
        num = sum(((a[run][k] - b[run][k]).double() ** 2).sum() for k in b[run]) ** 0.5
        out[run] = float(num / sum((a[run][k].double() ** 2).sum() for k in b[run]) ** 0.5)
    return out


def test_fsdp_over_2_processes_matches_one_and_lamb_lars_need_whole_tensor_norms(tmp_path):
    """SGD+momentum, AdamW, LAMB and LARS on the MLP and the transformer, 20 steps, and accumulation /
    activation checkpointing with clipping: 2-process FSDP vs 1 process within 1e-5 relative; LAMB/LARS with
    each shard's own norms (no reduction) miss that by far. fp16 with repeated overflows: the ranks agree on
    every skipped step (the overflow flag is summed over the shards)."""
    worker = str(Path(__file__).with_name("fsdp_worker.py"))

    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt")], capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert torchrun(worker, str(tmp_path / "two.pt"), str(tmp_path / "local.pt")) == 0
    single, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    ranks = two.pop("fp16-ranks")  # fp16 with overflows: every rank skipped the same steps
    assert ranks[0] == ranks[1] and ranks[0][0] >= 3, ranks
    sharded = relative_differences(single, two)
    assert len(sharded) == 11 and max(sharded.values()) < 1e-5, sharded
    per_shard = relative_differences(single, torch.load(tmp_path / "local.pt"))
    assert len(per_shard) == 4 and min(per_shard.values()) > 1e-4, per_shard


def test_an_fsdp_run_resumes_on_another_number_of_processes_and_survives_a_crash_mid_save(tmp_path, capsys):
    """Sharded checkpoints: 2 -> 1, 2 -> 4 and 1 -> 2 processes mid-run match an uninterrupted 2-process FSDP
    run; a rank killed after writing its shards of a checkpoint, before last.pt named them, leaves the
    previous checkpoint in force, and the resumed run ends on the straight run's exact weights. Early stopping's
    best weights travel in the shards too: with min_delta=1e9 only the first evaluation (step 5) counts as best,
    so every run ends by restoring weights that crossed a resume."""
    args = [*SMALL, "model.name=mlp", "optim.name=adamw", "schedule.name=constant", "diagnostics.every=0",
            "data.val_fraction=0.1", "train.eval_every=5", "early_stopping.patience=100",
            "early_stopping.min_delta=1e9", "train.checkpoint_every=5", "train.strategy=fsdp"]
    straight = in_process("train", "--nproc", "2", "--strategy", "fsdp", "--out", str(tmp_path / "straight"),
                          *args[:-1], "train.steps=20")  # --strategy fsdp is train.strategy=fsdp
    assert straight == 0 and "strategy: fsdp" in (tmp_path / "straight" / "config.yaml").read_text()
    first = tmp_path / "two-one"
    assert in_process("train", "--nproc", "2", "--out", str(first), *args, "train.steps=10") == 0
    assert [p.name for p in (first / "checkpoints").iterdir() if p.is_dir()] == [
        shards_folder(first).name], "one shard folder: the older checkpoint's is removed"
    assert sorted(p.name for p in shards_folder(first).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(first, tmp_path / "two-four")
    damaged = tmp_path / "damaged"  # one flipped byte in rank 1's shard file: refused in one line, naming it
    shutil.copytree(first, damaged)
    shard = shards_folder(damaged) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["train", "--resume", str(damaged), "train.steps=20"]) == 2
    refused = capsys.readouterr().err
    assert len(refused.strip().splitlines()) == 1 and f"'{shard}' is corrupt" in refused, refused
    assert in_process("train", "--resume", str(first), "train.steps=20") == 0
    assert in_process("train", "--nproc", "4", "--resume", str(tmp_path / "two-four"), "train.steps=20") == 0
    assert in_process("train", "--out", str(tmp_path / "one-two"), *args, "train.steps=10") == 0
    assert in_process("train", "--nproc", "2", "--resume", str(tmp_path / "one-two"), "train.steps=20") == 0
    crashed = tmp_path / "crashed"
    died = torchrun(str(Path(__file__).with_name("fault_run.py")), "mid-shard-save", "train", "--out", str(crashed),
                    *args, "train.steps=20")
    assert died != 0 and len([p for p in (crashed / "checkpoints").iterdir() if p.is_dir()]) == 2
    assert torch.load(crashed / "checkpoints" / "last.pt", weights_only=True)["step"] == 5  # the previous one
    assert in_process("train", "--nproc", "2", "--resume", str(crashed), "train.steps=20") == 0
    assert summary(crashed)["params_sha256"] == summary(tmp_path / "straight")["params_sha256"]
    after, before = weights(crashed), weights(tmp_path / "straight")  # the step-20 weights, not early stopping's
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert len([p for p in (crashed / "checkpoints").iterdir() if p.is_dir()]) == 1  # the unnamed folder is gone
    straight = weights(tmp_path / "straight")
    for name, world in (("two-one", 1), ("two-four", 4), ("one-two", 2)):
        resumed = weights(tmp_path / name)
        num = sum(((straight[k] - resumed[k]).double() ** 2).sum() for k in straight) ** 0.5
        assert float(num / sum((straight[k].double() ** 2).sum() for k in straight) ** 0.5) < 1e-5, name
        result = summary(tmp_path / name)
        assert result["resumed_from"] == 10 and result["world_size"] == world
        assert result["early_stopping"]["best_step"] == 5  # restored from the model-shaped state of the shards
        assert result["test_loss"] == pytest.approx(summary(tmp_path / "straight")["test_loss"], rel=1e-5)
    # the documented export: one file of the whole model, for torch.load(weights_only=True) and load_state_dict
    assert main(["export", str(tmp_path / "two-four"), "--out", str(tmp_path / "model.pt")]) == 0
    model = build_model(load_config(None, args).model, (40,), 10, "classification")
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict: every key, every shape
    exported = model.state_dict()
    num = sum(((straight[k] - exported[k]).double() ** 2).sum() for k in straight) ** 0.5
    assert float(num / sum((straight[k].double() ** 2).sum() for k in straight) ** 0.5) < 1e-5
