"""Synchronous data parallel through `gradwise train --nproc N` (torchrun, gloo on CPU): equivalence with one
process, resume across a change of N, elastic restart after SIGKILL, and input errors (issue 7)."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SMALL
from gradwise.cli import main
from gradwise.config import load_config
from gradwise.checkpoint.sharded import full_states
from gradwise.parallel.ddp import shard
from gradwise.launch import free_port
from gradwise.nn import build_model
from gradwise.data.sampler import EpochBatches
from gradwise.checkpoint.format import load_checkpoint

BASE = [*SMALL, "optim.name=sgd", "optim.lr=0.05", "diagnostics.every=0"]


def gradwise(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradwise", *args], capture_output=True, text=True, timeout=timeout)


def in_process(*args: str) -> int:
    """A one-process run through the CLI's own `main`, here: no interpreter, torch and torch._dynamo start-up
    to pay (a few seconds a process)."""
    return main(list(args))


def run_script(path: Path, *args: str) -> None:
    """`python path args`, here (a script's one-process run)."""
    saved = sys.argv
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of the run's last checkpoint (a sharded one read whole)."""
    return full_states(load_checkpoint(run_dir / "checkpoints" / "last.pt"))[0]


def shards_folder(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["shards"]["dir"]


def assert_same_weights(a: Path, b: Path, rtol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        scale = wa[name].abs().max().clamp(min=1e-12)
        assert ((wa[name] - wb[name]).abs().max() / scale) < rtol, name


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# -- sharding --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, world", [(64, 2), (16, 3), (7, 4), (3, 4), (1000, 7)])
def test_shards_cover_the_batch_once_in_order(n, world):
    parts = [shard(n, r, world) for r in range(world)]
    rows = [i for p in parts for i in range(p.start, p.stop)]
    assert rows == list(range(n))  # every row once, rank order = the single-process order
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_sharded_epoch_covers_each_sample_exactly_once():
    batches = EpochBatches(400, 64, seed=3)
    seen = []
    for _ in range(batches.per_epoch):
        idx = batches.next()
        for r in range(3):
            seen.extend(idx[shard(len(idx), r, 3)].tolist())
    assert sorted(seen) == list(range(400))


# -- equivalence -----------------------------------------------------------------------------------------------


COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]  # DDP's compiled path, no code generation


def test_two_processes_match_one_process(tmp_path):
    """2 processes x global batch 64 for 20 steps (crossing epochs, with partial last batches) = 1 x 64, with
    accumulation (`no_sync` on all but the last micro-batch) and the 2 processes compiled (torch.compile around
    DDP). DDP without accumulation or compile runs in the resume, restart and user-script tests below."""
    args = [*BASE, "train.steps=20", "train.checkpoint_every=20", "train.accumulate=2"]
    assert in_process("train", "--out", str(tmp_path / "one"), *args) == 0
    two = gradwise("train", "--nproc", "2", "--out", str(tmp_path / "two"), *args, *COMPILED)
    assert two.returncode == 0, two.stderr
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    s1, s2 = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert s2["world_size"] == 2 and s2["epochs"] == s1["epochs"]
    assert s2["test_loss"] == pytest.approx(s1["test_loss"], rel=1e-5)  # evaluation reduced over ranks
    assert s2["final_train_loss"] == pytest.approx(s1["final_train_loss"], rel=1e-5)  # loss reduced over ranks
    # rank 0 alone writes: one record per logged step
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps))


def test_resume_across_a_change_of_process_count(tmp_path):
    args = [*BASE, "schedule.name=constant", "train.checkpoint_every=100"]
    assert in_process("train", "--out", str(tmp_path / "straight"), "train.steps=20", *args) == 0
    # 2 processes for 10 steps, then 1 process to 20
    r = gradwise("train", "--nproc", "2", "--out", str(tmp_path / "a"), "train.steps=10", *args)
    assert r.returncode == 0, r.stderr
    assert in_process("train", "--resume", str(tmp_path / "a"), "train.steps=20") == 0
    # 1 process for 10 steps, then 2 FSDP processes to 20, compiled (fully_shard, then torch.compile)
    assert in_process("train", "--out", str(tmp_path / "b"), "train.steps=10", *args) == 0
    r = gradwise("train", "--nproc", "2", "--resume", str(tmp_path / "b"), "train.steps=20", "train.strategy=fsdp",
                 *COMPILED)
    assert r.returncode == 0, r.stderr
    for run in ("a", "b"):
        assert summary(tmp_path / run)["steps"] == 20 and summary(tmp_path / run)["resumed_from"] == 10
        assert_same_weights(tmp_path / "straight", tmp_path / run)


def test_two_nodes_rendezvous_through_the_endpoint(tmp_path):
    """Two `gradwise train --nnodes 2` launchers (here on one machine) form one group of 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*BASE, "train.steps=10"]
    node = ["train", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "60",
            "--out", str(tmp_path / "two-nodes"), *args]
    first = subprocess.Popen([sys.executable, "-m", "gradwise", *node], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    second = gradwise(*node)
    first_out, first_err = first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first_err + second.stderr
    assert in_process("train", "--out", str(tmp_path / "one"), *args) == 0
    assert summary(tmp_path / "two-nodes")["world_size"] == 2
    assert_same_weights(tmp_path / "one", tmp_path / "two-nodes")


# -- elastic restart -------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_with_rank(launcher_pid: int, rank: int) -> int | None:
    for pid in descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"LOCAL_RANK={rank}".encode() in env:
            return pid
    return None


KILLED_RUNS = {  # (steps, args): long enough that a worker is still training once the first checkpoint exists
    "ddp": (500, [*SMALL, "model.channels=[32,32]", "optim.name=sgd"]),
    "fsdp": (200, [*SMALL, "model.name=mlp", "optim.name=adamw", "train.strategy=fsdp"]),
}


@pytest.mark.parametrize("strategy", KILLED_RUNS)
def test_a_killed_worker_is_restarted_and_the_result_is_unchanged(tmp_path, strategy):
    """SIGKILL of rank 1 with --max-restarts 1: the group restarts from the last (FSDP: sharded) checkpoint and
    ends on the uninterrupted run's exact weights."""
    steps, run = KILLED_RUNS[strategy]
    args = [*run, f"train.steps={steps}", "train.checkpoint_every=50", "log.every=50", "log.progress=plain",
            "diagnostics.every=0"]
    straight = gradwise("train", "--nproc", "2", "--out", str(tmp_path / "straight"), *args)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gradwise", "train", "--nproc", "2", "--max-restarts", "1",
                             "--out", str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        checkpoint = out / "checkpoints" / "last.pt"
        victim = worker_with_rank(proc.pid, 1)
        if checkpoint.exists() and victim is not None:
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=180)
    assert killed_at is not None, "the run finished before a worker could be killed; make it longer"
    assert proc.returncode == 0, stderr
    assert "restart 1: continuing from step" in stdout
    result = summary(out)
    assert result["restarts"] == 1 and result["steps"] == steps
    assert result["params_sha256"] == summary(tmp_path / "straight")["params_sha256"]


# -- errors ----------------------------------------------------------------------------------------------------


def test_port_in_use_is_an_input_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = gradwise("train", "--nproc", "2", "--port", str(port), "--out", str(tmp_path / "x"), *BASE)
    assert r.returncode == 2 and f"--port={port} is in use" in r.stderr
    assert not (tmp_path / "x").exists()


def test_more_processes_than_the_batch_or_the_data_is_an_input_error(tmp_path):
    r = gradwise("train", "--nproc", "3", "--out", str(tmp_path / "x"), *BASE, "train.batch_size=2")
    assert r.returncode == 2 and "train.batch_size=2 is smaller than the 3 processes" in r.stderr
    r = gradwise("train", "--nproc", "4", "--out", str(tmp_path / "x"), "data.name=digits",
                 "data.test_fraction=0.999", "train.batch_size=8", "train.steps=2")
    assert r.returncode == 2 and "4 processes but only 2 training samples" in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_node_that_never_joins_times_out_with_exit_2(tmp_path):
    started = time.time()
    r = gradwise("train", "--nproc", "1", "--nnodes", "2", "--rdzv-timeout", "2", "--out", str(tmp_path / "x"),
                 *BASE, timeout=120)
    assert r.returncode == 2 and "not all 2 node(s) joined" in r.stderr
    assert time.time() - started < 60


def test_sync_batchnorm_on_cpu_is_a_config_error(tmp_path):
    r = gradwise("train", "--nproc", "2", "--out", str(tmp_path / "x"), *BASE, "train.sync_batchnorm=true",
                 "model.norm=batch", "train.steps=2")
    assert r.returncode == 2 and "train.sync_batchnorm=true needs CUDA" in r.stderr


def test_bench_distributed_reports_both_group_sizes():
    from gradwise.bench.distributed import run

    result = run(steps=3, repeats=1, overrides=["model.channels=[8,8]", "model.kernel_sizes=[5,3]"],
                 sharding_counts=(1, 2))
    rows = {r["processes"]: r for r in result["rows"] if isinstance(r["processes"], int)}
    assert set(rows) == {1, 2} and rows[1]["throughput vs 1 process"] == 1.0
    straggler = result["straggler"]  # SSGD vs ASGD with a slow worker, on the Ray parameter server
    assert straggler["ssgd_over_asgd"] > 0 and len(straggler["times_s_per_gradient"]["asgd"]) == 1
    assert rows[2]["samples/s"] > 0 and rows[2]["communication share of step"] < 1
    assert len(result["raw"]["2"][0]["nosync_s_per_step"]) == 2  # rounds without the all-reduce were timed
    memory = {r["strategy"]: r for r in result["tables"]["DDP vs FSDP, per rank"]}
    assert set(memory) == {"one process", "ddp", "fsdp"}
    assert memory["ddp"]["total vs one process"] == 1.0  # a full replica
    assert memory["fsdp"]["total vs one process"] < 0.6  # each rank holds about half (and FSDP's padding)


def test_every_rank_trains_with_rank_0s_plan_when_their_timings_differ(tmp_path):
    """memory.auto=true under 2 processes: rank 1's trials favour fp32, rank 0's bf16; both train rank 0's choice."""
    out = tmp_path / "auto"
    out.mkdir()
    worker = Path(__file__).with_name("planner_rank_worker.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(worker), "train", "--out", str(out), *BASE,
         "train.steps=4", "memory.auto=true", "memory.budget=4GiB", "model.channels=[4]", "model.kernel_sizes=[3]"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["precision"] == "bf16" and ranks[0]["memory"]["auto"] is False
    assert "precision: bf16" in (out / "config.yaml").read_text()


def test_a_users_script_under_torchrun_trains_data_parallel_with_no_extra_code(tmp_path):
    script = Path(__file__).with_name("user_ddp_script.py")
    run_script(script, str(tmp_path / "one"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                          f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script), str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-2000:]
    assert summary(tmp_path / "one")["world_size"] == 1 and summary(tmp_path / "two")["world_size"] == 2
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert summary(tmp_path / "two")["test_loss"] == pytest.approx(summary(tmp_path / "one")["test_loss"], rel=1e-5)
    # dataset-level metrics: each rank scores its half, the states are merged (a rank's rows count once)
    assert summary(tmp_path / "two")["test_f1"] == summary(tmp_path / "one")["test_f1"]
    assert summary(tmp_path / "one")["test_rows"] == summary(tmp_path / "two")["test_rows"] == 50
    # a rank that dies after the final checkpoint: torchrun restarts the group, which completes the run
    died = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
                           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script),
                           str(tmp_path / "died"), "die-after-final"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # pytorch/pytorch#135712
    assert died.returncode == 0, died.stderr[-2000:]
    assert summary(tmp_path / "died")["params_sha256"] == summary(tmp_path / "two")["params_sha256"]


# -- FSDP -----------------------------------------------------------------------------------------------------


def test_a_users_model_under_fsdp_matches_one_process_and_a_nan_on_one_rank_rolls_back_every_rank(tmp_path):
    """A user's model sharded per Linear (train.shard_modules) under torchrun, resumed from a one-process run
    (whole file -> shards) = straight FSDP, health records included (whole-tensor norms); a non-finite output on
    rank 1 alone makes every rank take the same path (diagnosis without collectives, one rollback through the
    sharded checkpoint) instead of hanging. Both resumes start a fresh optimizer, and the spare layer has no
    optimizer state: it must get none from the load either."""
    script = str(Path(__file__).with_name("user_ddp_script.py"))

    def torchrun(out: str, *options: str):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", script,
                              str(tmp_path / out), "fsdp", *options], capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-2000:]

    torchrun("two")
    run_script(Path(script), str(tmp_path / "one-two"), "fsdp", "stop-at-10")
    torchrun("one-two")  # resumed at step 10 on 2 processes
    torchrun("nan", "nan-on-rank-1", "stop-at-10")
    torchrun("nan", "nan-on-rank-1")  # resumed at step 10
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

    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", worker, *args],
                              capture_output=True, text=True, timeout=300)

    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt")], capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    run = torchrun(str(tmp_path / "two.pt"), str(tmp_path / "local.pt"))
    assert run.returncode == 0, run.stderr[-2000:]
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
    straight = gradwise("train", "--nproc", "2", "--strategy", "fsdp", "--out", str(tmp_path / "straight"),
                        *args[:-1], "train.steps=20")  # --strategy fsdp is train.strategy=fsdp
    assert straight.returncode == 0 and "strategy: fsdp" in (tmp_path / "straight" / "config.yaml").read_text()
    first = tmp_path / "two-one"
    assert gradwise("train", "--nproc", "2", "--out", str(first), *args, "train.steps=10").returncode == 0
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
    assert gradwise("train", "--nproc", "4", "--resume", str(tmp_path / "two-four"), "train.steps=20").returncode == 0
    assert in_process("train", "--out", str(tmp_path / "one-two"), *args, "train.steps=10") == 0
    assert gradwise("train", "--nproc", "2", "--resume", str(tmp_path / "one-two"), "train.steps=20").returncode == 0
    crashed = tmp_path / "crashed"
    died = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(Path(__file__).with_name("fault_run.py")),
                           "mid-shard-save", "train", "--out", str(crashed), *args, "train.steps=20"],
                          capture_output=True, text=True, timeout=180)
    assert died.returncode != 0 and len([p for p in (crashed / "checkpoints").iterdir() if p.is_dir()]) == 2
    assert torch.load(crashed / "checkpoints" / "last.pt", weights_only=True)["step"] == 5  # the previous one
    assert gradwise("train", "--nproc", "2", "--resume", str(crashed), "train.steps=20").returncode == 0
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
