"""The memory planner and memory.auto, on a tiny job."""

import json

import pytest
import yaml

from gradwise.cli import main
from gradwise.config import parse_bytes
from gradwise.tools.planner import apply_choice, candidate_micro_batches, plan

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
