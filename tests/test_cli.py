"""Exit codes and messages of the command line, and that bad input never damages a run."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from gradwise.cli import main

from conftest import SMALL


def check_one_line_error(capsys, code, *fragments):
    out = capsys.readouterr()
    assert code == 2
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err
    for fragment in fragments:
        assert fragment in lines[0]


def test_python_dash_m_and_exit_codes_from_a_real_process(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gradwise", "train", "--print-config", "optim.lr=0.5"],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["optim"]["lr"] == 0.5
    bad = subprocess.run([sys.executable, "-m", "gradwise", "train", "optim.nme=sgd"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "optim.nme" in bad.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for bad input


def test_print_config_shows_the_resolved_tree(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  batch_size: 17\n")
    assert main(["train", "--config", str(config), "--print-config", "seed=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["batch_size"] == 17 and printed["seed"] == 4 and printed["model"]["name"] == "cnn"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "model.name=resnet"], ["model.name='resnet'", "'cnn'"]),
        (["train", "train.batch_size=0"], ["train.batch_size=0"]),
        (["train", "--config", "/nonexistent.yaml"], ["/nonexistent.yaml"]),
        (["train", "data.name=npz", "data.path=/nonexistent.npz"], ["data.path='/nonexistent.npz'"]),
        (["train", "--nope"], ["--nope"]),
        (["bench", "nosuch"], ["nosuch", "overhead"]),
        (["train", "--resume", "/nonexistent-run"], ["not a run directory"]),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, fragments):
    try:
        code = main(args)
    except SystemExit as exit:  # argparse errors
        code = exit.code
    check_one_line_error(capsys, code, *fragments)


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "train.steps=3", *SMALL]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    check_one_line_error(capsys, main(["train", "--out", str(run), "train.steps=3", *SMALL]), "already holds a run")
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_bad_resumes_leave_the_run_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "train.steps=4", *SMALL]) == 0
    capsys.readouterr()
    snapshot = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # noqa: E731
    before = snapshot()

    # nothing left to do
    check_one_line_error(capsys, main(["train", "--resume", str(run)]), "step 4", "train.steps=M")
    # a key that would change the trajectory
    check_one_line_error(capsys, main(["train", "--resume", str(run), "optim.lr=1"]), "optim.lr", "cannot change")
    assert snapshot() == before

    # a checkpoint from a different model
    other = tmp_path / "other"
    assert main(["train", "--out", str(other), "train.steps=2", *SMALL, "model.channels=[4,4]"]) == 0
    capsys.readouterr()
    ckpt = run / "checkpoints" / "last.pt"
    ckpt.write_bytes((other / "checkpoints" / "last.pt").read_bytes())
    mismatched = snapshot()
    check_one_line_error(capsys, main(["train", "--resume", str(run), "train.steps=8"]),
                         "'model.channels' is [8, 8] now", "but [4, 4] in the checkpoint", "cannot change on resume")
    assert snapshot() == mismatched

    # a corrupt checkpoint
    ckpt.write_bytes(b"\x00garbage")
    corrupt = snapshot()
    check_one_line_error(capsys, main(["train", "--resume", str(run), "train.steps=8"]), "unreadable or corrupt")
    assert snapshot() == corrupt

    # a missing checkpoint
    ckpt.unlink()
    check_one_line_error(capsys, main(["train", "--resume", str(run), "train.steps=8"]), "no checkpoint")


def test_train_writes_the_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), "train.steps=20", "train.eval_every=10", "log.every=5",
                 *[o for o in SMALL if not o.startswith(("log.plots", "log.progress"))], "log.progress=plain"])
    assert code == 0
    out = capsys.readouterr().out
    assert "step 5/20" in out and "eval 10/20" in out and "done: test_accuracy" in out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt",
                 "plots/loss.png", "plots/accuracy.png"):
        assert (run / name).is_file(), name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["schedule"]["total_steps"] == 20  # the horizon is fixed when the run starts
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for r in train:  # the lr logged is the one the update at that step used (default: cosine over 20 steps)
        assert r["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / 20)))
    assert not list(run.rglob("*.tmp"))


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from gradwise.io import write_text

    write_text(tmp_path / "x.txt", "hello")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
