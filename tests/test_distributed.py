"""Synchronous data parallel through `gradwise train --nproc N` (torchrun, gloo on CPU): equivalence with one
process, resume across a change of N, elastic restart after SIGKILL, and input errors (issue 7). FSDP: test_fsdp.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL
from gradwise.parallel.ddp import shard
from gradwise.data.sampler import EpochBatches
from launching import BASE, assert_same_weights, in_process, run_script, summary, torchrun

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
    assert in_process("train", "--nproc", "2", "--out", str(tmp_path / "two"), *args, *COMPILED) == 0
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
    assert in_process("train", "--nproc", "2", "--out", str(tmp_path / "a"), "train.steps=10", *args) == 0
    assert in_process("train", "--resume", str(tmp_path / "a"), "train.steps=20") == 0
    # 1 process for 10 steps, then 2 FSDP processes to 20, compiled (fully_shard, then torch.compile)
    assert in_process("train", "--out", str(tmp_path / "b"), "train.steps=10", *args) == 0
    assert in_process("train", "--nproc", "2", "--resume", str(tmp_path / "b"), "train.steps=20",
                      "train.strategy=fsdp", *COMPILED) == 0
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
    assert in_process(*node) == 0
    first_out, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
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
    assert in_process("train", "--nproc", "2", "--out", str(tmp_path / "straight"), *args) == 0
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


def test_port_in_use_is_an_input_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert in_process("train", "--nproc", "2", "--port", str(port), "--out", str(tmp_path / "x"), *BASE) == 2
    assert f"--port={port} is in use" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_what_a_group_cannot_run_is_refused_before_any_process_starts(tmp_path, capsys):
    """A batch or a training set smaller than the group, SyncBatchNorm without CUDA: one line from the
    launching command, no worker started, nothing written."""
    assert in_process("train", "--nproc", "3", "--out", str(tmp_path / "x"), *BASE, "train.batch_size=2") == 2
    assert "train.batch_size=2 is smaller than the 3 processes" in capsys.readouterr().err
    assert in_process("train", "--nproc", "4", "--out", str(tmp_path / "x"), "data.name=digits",
                      "data.test_fraction=0.999", "train.batch_size=8", "train.steps=2") == 2
    assert "4 processes but only 2 training samples" in capsys.readouterr().err
    assert in_process("train", "--nproc", "2", "--out", str(tmp_path / "x"), *BASE, "train.sync_batchnorm=true",
                      "model.norm=batch", "train.steps=2") == 2
    err = capsys.readouterr().err
    assert "train.sync_batchnorm=true needs CUDA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_node_that_never_joins_times_out_with_exit_2(tmp_path, capsys):
    started = time.time()
    assert in_process("train", "--nproc", "1", "--nnodes", "2", "--rdzv-timeout", "2", "--out", str(tmp_path / "x"),
                      *BASE) == 2
    assert "not all 2 node(s) joined" in capsys.readouterr().err
    assert time.time() - started < 60


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
    assert torchrun(str(worker), "train", "--out", str(out), *BASE, "train.steps=4", "memory.auto=true",
                    "memory.budget=4GiB", "model.channels=[4]", "model.kernel_sizes=[3]") == 0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["precision"] == "bf16" and ranks[0]["memory"]["auto"] is False
    assert "precision: bf16" in (out / "config.yaml").read_text()
    # a Trainer of the script's own model plans on it, and every rank trains with rank 0's plan too
    mine = tmp_path / "mine"
    mine.mkdir()
    assert torchrun(str(worker), "user", str(mine)) == 0
    ranks = [json.loads((mine / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["precision"] == "bf16" and ranks[0]["memory"]["auto"] is False


def test_a_users_script_under_torchrun_trains_data_parallel_with_no_extra_code(tmp_path):
    script = Path(__file__).with_name("user_ddp_script.py")
    run_script(script, str(tmp_path / "one"))
    assert torchrun(str(script), str(tmp_path / "two")) == 0
    assert summary(tmp_path / "one")["world_size"] == 1 and summary(tmp_path / "two")["world_size"] == 2
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert summary(tmp_path / "two")["test_loss"] == pytest.approx(summary(tmp_path / "one")["test_loss"], rel=1e-5)
    # dataset-level metrics: each rank scores its half, the states are merged (a rank's rows count once)
    assert summary(tmp_path / "two")["test_f1"] == summary(tmp_path / "one")["test_f1"]
    assert summary(tmp_path / "one")["test_rows"] == summary(tmp_path / "two")["test_rows"] == 50
    # a rank that dies after the final checkpoint: torchrun restarts the group, which completes the run
    assert torchrun(str(script), str(tmp_path / "died"), "die-after-final", max_restarts=1,
                    env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}) == 0  # pytorch/pytorch#135712
    assert summary(tmp_path / "died")["params_sha256"] == summary(tmp_path / "two")["params_sha256"]
