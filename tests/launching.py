"""Shared by the torchrun tests (test_distributed.py, test_fsdp.py): the CLI in a subprocess or in this
process, a user's script run here, and what a run folder holds."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch

from conftest import SMALL
from gradwise.checkpoint.format import load_checkpoint
from gradwise.checkpoint.sharded import full_states
from gradwise.cli import main
from gradwise.launch import free_port

BASE = [*SMALL, "optim.name=sgd", "optim.lr=0.05", "diagnostics.every=0"]


def gradwise(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradwise", *args], capture_output=True, text=True, timeout=timeout)


def in_process(*args: str) -> int:
    """A one-process run through the CLI's own `main`, here: no interpreter, torch and torch._dynamo start-up
    to pay (a few seconds a process)."""
    return main(list(args))


def torchrun(*argv: str, nproc: int = 2, max_restarts: int = 0, env: dict[str, str] | None = None) -> int:
    """`torchrun --nproc-per-node NPROC --max-restarts N ARGV` with its elastic agent in this process (the
    workers are processes of their own); 0, or 1 when the group failed. The environment is put back after it
    (torchrun sets OMP_NUM_THREADS)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        run(get_args_parser().parse_args([f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
                                          "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                                          *argv]))
        return 0
    except ChildFailedError:
        return 1
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_script(path: Path, *args: str) -> None:
    """`python path args`, here (a script's one-process run): its argv, and its folder first on the path."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(Path(path).parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


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
