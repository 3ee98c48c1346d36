"""Fault injection: a run killed at named points recovers exactly; every file a run writes, damaged, is
either recovered from or refused in one line with nothing changed; locks, full disks and bad paths."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import SMALL
from gradwise.cli import main
from gradwise.train.run_dir import RunLock

RUN = [*SMALL, "train.steps=12", "train.checkpoint_every=4", "train.eval_every=4", "log.every=4",
       "diagnostics.every=0"]
FAULT_RUN = Path(__file__).with_name("fault_run.py")


def gradwise(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradwise", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def records(folder: Path) -> list[tuple]:
    return [(r["kind"], r["step"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def one_line(result, code: int, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert gradwise("train", "--out", str(out), *RUN).returncode == 0
    return out


@pytest.mark.parametrize("point", ["before-first-checkpoint", "mid-checkpoint-write", "during-evaluation",
                                   "after-final-checkpoint"])
def test_a_run_killed_at_a_named_point_resumes_to_the_reference(point, reference, tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(FAULT_RUN), point, "train", "--out", str(out), *RUN],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    resumed = gradwise("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert summary(out)["params_sha256"] == summary(reference)["params_sha256"]
    assert summary(out)["test_loss"] == summary(reference)["test_loss"]
    assert records(out) == records(reference)  # nothing logged twice, nothing lost
    assert not [p for p in out.rglob("*.tmp")]  # the killed write's temp file is gone


def test_the_original_command_replaces_an_attempt_killed_before_its_first_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, str(FAULT_RUN), "before-first-checkpoint", "train", "--out", str(out), *RUN],
                   capture_output=True, timeout=300)
    again = gradwise("train", "--out", str(out), *RUN)
    assert again.returncode == 0, again.stderr[-2000:]
    assert summary(out)["params_sha256"] == summary(reference)["params_sha256"]


def damage_tensor_bytes(path: Path) -> None:
    """Overwrite 4 bytes inside a tensor's data record of the checkpoint's zip archive (the zip stays valid)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(raw[info.header_offset + k:info.header_offset + k + 2], "little")
                                 for k in (26, 28))  # the local header's (its alignment padding is extra)
    start = info.header_offset + 30 + name_length + extra_length
    raw[start + 16:start + 20] = b"\xde\xad\xbe\xef"
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "checkpoint tensor bytes": ("checkpoints/last.pt", damage_tensor_bytes, "is corrupt (its content does not match"),
    "checkpoint truncated": ("checkpoints/last.pt", lambda p: p.write_bytes(p.read_bytes()[:5000]),
                             "unreadable or corrupt"),
    "checkpoint replaced by garbage": ("checkpoints/last.pt", lambda p: p.write_bytes(random.Random(0).randbytes(2000)),
                                       "unreadable or corrupt"),
    "config.yaml garbage": ("config.yaml", lambda p: p.write_text("{{{ not yaml"), "config error"),
    "config.yaml lr edited": ("config.yaml", lambda p: p.write_text(p.read_text().replace("lr: 0.01", "lr: 0.02")),
                              "'optim.lr' is 0.02 now but 0.01 in the checkpoint"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_damaged_run_file_is_refused_in_one_line_with_nothing_changed(name, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SMALL, "train.steps=4"]) == 0
    relative, damage, message = CORRUPTIONS[name]
    damage(out / relative)
    before = files(out)
    capsys.readouterr()
    code = main(["train", "--resume", str(out), "train.steps=8"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert files(out) == before


def test_damaged_metrics_and_summary_files_do_not_stop_a_resume(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SMALL, "train.steps=4"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a torn last line
    (out / "summary.json").write_text("garbage")
    (out / "checkpoints" / ".last.pt.stale.tmp").write_bytes(b"x" * 1000)  # a killed write's leftover
    assert main(["train", "--resume", str(out), "train.steps=8"]) == 0
    assert summary(out)["steps"] == 8
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert not list(out.rglob("*.tmp"))


def test_a_run_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SMALL, "train.steps=4"]) == 0
    before = files(out)
    lock = RunLock(out).acquire()
    try:
        capsys.readouterr()
        assert main(["train", "--resume", str(out), "train.steps=8"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {os.getpid()}" in err and len(err.strip().splitlines()) == 1
    finally:
        lock.release()
    assert files(out) == before
    assert main(["train", "--resume", str(out), "train.steps=8"]) == 0  # free again


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SMALL, "train.steps=4"]) == 0
    checkpoint = out / "checkpoints" / "last.pt"
    before, size = checkpoint.read_bytes(), checkpoint.stat().st_size

    def small_disk() -> None:  # files may grow to half a checkpoint: its next write fails as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    full = subprocess.run([sys.executable, "-m", "gradwise", "train", "--resume", str(out), "train.steps=8"],
                          capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    one_line(full, 1, "write error", "last.pt", "File too large")
    assert checkpoint.read_bytes() == before and not list(out.rglob("*.tmp"))
    assert main(["train", "--resume", str(out), "train.steps=8"]) == 0  # room again: it continues


def test_unusable_out_paths_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    for out, fragment in ((a_file, "is a file, not a folder"), (a_file / "run", "cannot use")):
        capsys.readouterr()
        assert main(["train", "--out", str(out), *SMALL, "train.steps=2"]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def npz(path: Path, y) -> Path:
    import numpy as np

    np.savez(path, x=np.random.default_rng(0).normal(size=(len(y), 4)).astype("float32"), y=np.asarray(y))
    return path


@pytest.mark.parametrize("case", ["string labels", "a label of 10^12", "lr inf", "momentum nan",
                                  "one sample", "clip_norm inf"])
def test_bad_inputs_are_one_line_errors_that_write_nothing(case, tmp_path, capsys):
    overrides, fragment = {
        "string labels": (["data.name=npz", f"data.path={npz(tmp_path / 'a.npz', ['cat', 'dog'] * 10)}"],
                          "labels must be numbers (class indices), got dtype <U3"),
        "a label of 10^12": (["data.name=npz", f"data.path={npz(tmp_path / 'b.npz', [0, 1] * 9 + [10**12, 1])}"],
                             "has a label of 1000000000000; labels are class indices 0..99999"),
        "lr inf": (["optim.lr=.inf"], "optim.lr=inf: Input should be a finite number"),
        "momentum nan": (["optim.momentum=nan"], "optim.momentum='nan': Input should be a finite number"),
        "one sample": (["data.num_samples=1"], "data.num_samples=1: Input should be greater than or equal to 10"),
        "clip_norm inf": (["train.clip_norm=inf"], "train.clip_norm='inf': Input should be a finite number"),
    }[case]
    before = files(tmp_path)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), *SMALL, "train.steps=2", *overrides]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert files(tmp_path) == before and not (tmp_path / "run").exists()


def test_a_truncated_mnist1d_cache_is_regenerated(tmp_path):
    cache = tmp_path / "cache"
    args = ["train", *SMALL, "train.steps=2", f"data.cache_dir={cache}"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    (cached,) = cache.glob("mnist1d-*.npz")
    cached.write_bytes(cached.read_bytes()[:1000])
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert summary(tmp_path / "a")["params_sha256"] == summary(tmp_path / "b")["params_sha256"]


def test_the_checksum_of_a_set_does_not_depend_on_the_hash_seed():
    code = ("from gradwise.checkpoint.format import content_sha256; "
            "print(content_sha256({'s': {'alpha', 'beta', 'gamma'}}))")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(digests) == 1


def test_files_gradwise_did_not_write_are_never_replaced(tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.yaml").write_text("my: own config\n")
    (out / "plots").mkdir()
    (out / "plots" / "figure.png").write_bytes(b"mine")
    before = files(out)
    assert main(["train", "--out", str(out), *SMALL, "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "has a config.yaml that no gradwise run wrote" in err and len(err.strip().splitlines()) == 1
    assert {k: v for k, v in files(out).items() if k != ".gradwise.lock"} == before


def test_a_stateless_optimizer_resumes_exactly(tmp_path):
    """Plain SGD (momentum 0) keeps no optimizer state: its checkpoint still resumes, to the straight run."""
    args = [*SMALL, "optim.name=sgd", "optim.momentum=0", "optim.lr=0.05", "schedule.name=constant"]
    assert main(["train", "--out", str(tmp_path / "straight"), *args, "train.steps=8"]) == 0
    assert main(["train", "--out", str(tmp_path / "split"), *args, "train.steps=4"]) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "train.steps=8"]) == 0
    assert summary(tmp_path / "split")["params_sha256"] == summary(tmp_path / "straight")["params_sha256"]


def test_a_run_written_by_the_previous_checkpoint_format_resumes_exactly(tmp_path):
    """tests/data/v2_run: 10 steps written with format version 2 (each callback's state under a key of its own,
    `train.parallel` in config.yaml), resumed here to 20 steps: the weights of 20 straight steps today."""
    import shutil

    args = ["data.num_samples=500", "model.name=mlp", "model.width=16", "model.depth=1", "train.batch_size=32",
            "schedule.name=constant", "log.progress=off", "log.plots=false", "diagnostics.every=0"]
    shutil.copytree(Path(__file__).with_name("data") / "v2_run", tmp_path / "old")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the threads it was recorded with (a matmul's sums split by thread count)
    try:
        assert main(["train", "--resume", str(tmp_path / "old"), "train.steps=20"]) == 0
        assert main(["train", "--out", str(tmp_path / "new"), *args, "train.steps=20"]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed, straight = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("old", "new"))
    assert resumed["resumed_from"] == 10 and resumed["params_sha256"] == straight["params_sha256"]
