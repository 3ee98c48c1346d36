"""`gradwise train --nproc N`: start N worker processes through torch.distributed.run.

The launcher runs torchrun's elastic agent in this process (what the `torchrun`
command does): it rendezvouses with the other nodes (c10d store), starts
`python -m gradwise train ...` N times with RANK/WORLD_SIZE/LOCAL_RANK set,
and restarts the whole group up to `--max-restarts` times when a worker dies;
restarted workers resume from the run's last checkpoint. Everything a user can
get wrong (config, run directory, port, batch or data smaller than the group)
is checked here first, so it fails in one line with exit 2 instead of N times.

Many machines: run the same command on each with `--nnodes M --rdzv-endpoint
HOST:PORT` (HOST: one of the machines), or call torchrun directly:
`torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint
HOST:PORT -m gradwise train --out DIR ...`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import uuid
from dataclasses import dataclass
from typing import Callable

from gradwise.errors import NonFiniteError, UserInputError, describe_os_error, os_error_status
from gradwise.config import TrainConfig
from gradwise.parallel.ddp import (DistContext, check_batch_fits, check_sync_batchnorm, default_backend,
                                   init_process_group)


@dataclass
class LaunchOptions:
    nproc: int
    nnodes: int = 1
    max_restarts: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT; default 127.0.0.1 and a free port (or --port)
    port: int | None = None
    rdzv_timeout: float = 60.0
    rdzv_id: str = "gradwise"  # must be the same on every node of one run


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """Exit-2 error when `port` cannot be bound here (another run, or any other program, holds it)."""
    if not 0 < port < 65536:
        raise UserInputError(f"usage error: --port={port} is not a port (1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise UserInputError(
                f"usage error: --port={port} is in use on this machine; pick another --port or leave it out "
                "(a free one is chosen)"
            ) from None


def check_group_fits(world_size: int, train: TrainConfig, train_samples: int | None) -> None:
    """Before any process starts: every process needs a row of each batch and of the training set (None: a
    stream, of unknown length); what this machine cannot run (SyncBatchNorm without CUDA) is refused here rather
    than by every worker."""
    check_sync_batchnorm(train.sync_batchnorm, default_backend())
    check_batch_fits(train.batch_size, world_size)
    if train_samples is not None and train_samples < world_size:
        raise UserInputError(
            f"config error: {world_size} processes but only {train_samples} training samples; "
            f"use at most {train_samples} processes"
        )


def torchrun_argv(opts: LaunchOptions, worker_args: list[str], module: str = "gradwise") -> list[str]:
    """The torch.distributed.run command line for `python -m <module> <worker_args>` on this node."""
    if opts.rdzv_endpoint is None:
        port = opts.port if opts.port is not None else free_port()
        endpoint = f"127.0.0.1:{port}"
    else:
        endpoint = opts.rdzv_endpoint
    return [
        f"--nnodes={opts.nnodes}", f"--nproc-per-node={opts.nproc}", f"--max-restarts={opts.max_restarts}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={opts.rdzv_id if opts.nnodes > 1 else uuid.uuid4().hex}",
        f"--rdzv-conf=join_timeout={max(1, round(opts.rdzv_timeout))}", "--monitor-interval=0.2",
        "-m", module, *worker_args,
    ]


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch(opts: LaunchOptions, worker_args: list[str], module: str = "gradwise") -> int:
    """Run the elastic agent until the workers finish; returns the exit status for `gradwise train`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import get_args_parser, run

    if opts.rdzv_endpoint is None and opts.port is not None:
        check_port(opts.port)
    worker_env = {
        # share the cores instead of oversubscribing them
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc))),
        # Workers get their own store per attempt: with the rendezvous store shared (torch's default), a restarted
        # group can read the previous attempt's addresses and fail to connect (pytorch/pytorch#135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1"),
    }
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    args = get_args_parser().parse_args(torchrun_argv(opts, worker_args, module))
    try:
        with environment(worker_env):  # workers inherit it; this process's own environment is left as it was
            run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode == 2:  # the worker already printed its one-line input error
            return 2
        print(f"gradwise: worker rank {rank} failed with exit code {failure.exitcode} "
              f"after {opts.max_restarts} restart(s) allowed", flush=True)
        return 1
    except RendezvousTimeoutError:
        raise UserInputError(
            f"rendezvous error: not all {opts.nnodes} node(s) joined at {args.rdzv_endpoint} within "
            f"--rdzv-timeout={opts.rdzv_timeout:g}s; start the same command on every node, or check the endpoint"
        ) from None
    except RendezvousError as err:
        raise UserInputError(f"rendezvous error at {args.rdzv_endpoint}: {err}") from None
    return 0


def run_rank(work: Callable[[DistContext], None]) -> int:
    """One rank of a torchrun group: join it and run `work(ctx)`. The rank ends through `DistContext.finish`
    (exit status 0) rather than by returning, so a finished rank cannot abort in interpreter teardown; bad input
    or a non-finite run prints one line and exits 2 or 1, a failing write its own status."""
    ctx = init_process_group()
    try:
        work(ctx)
    except (UserInputError, NonFiniteError) as err:
        print(f"gradwise: {err}", file=sys.stderr, flush=True)
        os._exit(2 if isinstance(err, UserInputError) else 1)
    except OSError as err:
        print(f"gradwise: {describe_os_error(err)}", file=sys.stderr, flush=True)
        os._exit(os_error_status(err))
    ctx.finish()
    return 0
