"""Asynchronous parameter server on Ray (`--strategy async`): the driver, and the server actor's wrapper.

One server actor runs `Trainer.fit` over pushed gradients (gradwise.asynchronous.server);
M worker actors compute them (gradwise.asynchronous.worker). This process, the
driver, resolves the config once (every actor trains with that resolution),
starts the actors, and watches them: Ray restarts a dead worker actor (up to
`ps.max_worker_restarts`); the driver tells the server it left (its ticket
returns) and calls `run` on the new incarnation, which rejoins with the server's
current weights. When every worker has returned, the driver tells the server,
which writes the summary (with the restart counts) and returns it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from gradwise.asynchronous.server import PushedGradients
from gradwise.asynchronous.worker import UserRun, Worker, training_set
from gradwise.arguments import check_count, check_path, check_type, config_argument
from gradwise.config import Config, apply_overrides, validate
from gradwise.errors import ConfigError, DataError, NonFiniteError, UserInputError
from gradwise.resolve import resolve_config
from gradwise.tools.planner import plan_config
from gradwise.train import Trainer
from gradwise.train.factories import config_model
from gradwise.train.metrics import Progress
from gradwise.train.pipeline import adopt_settings
from gradwise.train.randomness import seed_everything
from gradwise.train.run_dir import refuse_existing_run


class ParameterServer:
    """The server actor: a Trainer whose step source is `PushedGradients`; `fit` runs on one actor thread.

    Everything that can fail on bad input (the config, the user's factories, the checkpoint) happens in
    `setup`, a method, so its error reaches the driver as the error itself (an actor's failed constructor
    reaches it only as a dead actor with a traceback)."""

    def setup(self, cfg_dict: dict, out_dir: str | None, workers: int, resume: bool = False,
              user: UserRun | None = None) -> None:

        cfg = validate(cfg_dict)
        self.source = PushedGradients(cfg, workers)
        if user is None:
            self.trainer = Trainer.from_config(cfg, out_dir=out_dir, source=self.source)
        else:
            seed_everything(cfg.seed)
            train, test = user.datasets()
            self.trainer = Trainer(user.model(), train, test_data=test, loss_fn=user.loss_fn, config=cfg,
                                   out_dir=out_dir, source=self.source, collate_fn=user.collate_fn,
                                   metrics=user.metrics)
        if resume:
            self.trainer.restore(out_dir)

    def fit(self) -> dict:
        return self.trainer.fit()

    def join(self, worker: int) -> dict:
        return self.source.join(worker)

    def leave(self, worker: int) -> None:
        self.source.leave(worker)

    def drop(self, worker: int) -> None:
        self.source.drop(worker)

    def fail(self, worker: int, where: str | None, stage: str) -> None:
        self.source.fail(worker, where, stage)

    def pull(self, worker: int) -> dict | None:
        return self.source.pull(worker)

    def push(self, *args) -> bool:
        return self.source.push(*args)

    def conclude(self, restarts: list[int]) -> None:
        self.source.conclude(restarts)


def check_async_config(cfg: Config, workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"usage error: --workers={workers} must be at least 1")
    slow = [w for w in cfg.ps.slowdowns() if w >= workers]
    if slow:
        raise ConfigError(f"config error: ps.slowdown={cfg.ps.slowdown} names worker {slow[0]}, but workers are "
                          f"numbered 0..{workers - 1}")
    if cfg.diagnostics.on_nonfinite == "rollback":
        raise ConfigError("config error: diagnostics.on_nonfinite=rollback is not supported with --strategy async "
                          "(workers hold tickets and weights pulled after the checkpoint); use "
                          "diagnostics.on_nonfinite=stop and resume with a lower optim.lr")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in at most `timeout_s` with one line when nothing listens at a Ray cluster's `host:port`."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]")  # an IPv6 literal: [::1]:6379
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise ConfigError(f"usage error: --ray-address={address}: no Ray cluster answers there "
                          f"({getattr(err, 'strerror', None) or err}); start one with `ray start --head` or "
                          "drop --ray-address to run on a fresh local instance") from None


def _interrupt_on_sigterm():
    """Make SIGTERM end the driver like Ctrl-C (KeyboardInterrupt: the actors are killed, and Ray's processes
    shut down at exit); returns the handler it replaced (None: one set from C; False off the main thread,
    where it cannot)."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _unwrapped(err: Exception) -> Exception:
    """The gradwise error inside a Ray task error (a one-line message), else the Ray error itself."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, (UserInputError, NonFiniteError, OSError)) else err


def train_async(cfg: Config, workers: int, out_dir: str | Path | None, ray_address: str | None = None,
                resume: bool = False, progress: str = "auto", user: UserRun | None = None) -> dict:
    """Run the parameter server and `workers` workers on Ray until the budget is spent; returns the summary.

    `user` (a `UserRun` of picklable factories) trains your own model and data instead of the built-in ones.
    """
    cfg = config_argument("cfg", cfg)
    check_count("workers", workers, optional=False)
    check_path("out_dir", out_dir)
    check_type("user", user, UserRun, "a gradwise UserRun of picklable factories")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("config error: --strategy async needs Ray: pip install 'gradwise[async]'")
    check_async_config(cfg, workers)
    if out_dir is not None and not resume:
        refuse_existing_run(Path(out_dir))
    pipeline, data = training_set(cfg, user)  # as every actor builds it
    if pipeline.streaming:
        raise DataError(f"data error: the parameter server splits a map-style training set's rows between its "
                        f"workers; got the streaming {type(pipeline.dataset).__name__}; train it with the Trainer "
                        "(one process, or torchrun for data parallel)")
    cfg = adopt_settings(cfg, pipeline)  # a DataLoader from data.factory: its batch and loader settings, for all
    if cfg.model.factory is not None:
        config_model(cfg, data)  # a factory that fails, fails here, before Ray starts
    train_size = len(pipeline.dataset)
    if cfg.ps.worker_threads is None:  # the threads this process computes with, shared among the workers
        threads = max(1, torch.get_num_threads() // workers)
        cfg = validate(apply_overrides(cfg.to_dict(), [f"ps.worker_threads={threads}"]))
    if user is not None and cfg.memory.auto:
        raise ConfigError("config error: memory.auto=true is not planned for a model of yours under the parameter "
                          "server; plan it first (gradwise.plan(model, data, budget=...).config) and pass that config")
    cfg = resolve_config(cfg, train_size, gradients_per_update=workers if cfg.ps.rule == "ssgd" else 1,
                         planner=plan_config)
    with ray_instance(ray_address):
        return _serve(cfg, workers, out_dir, resume, progress, user)


@contextlib.contextmanager
def ray_instance(address: str | None = None) -> Iterator[None]:
    """Ray for the runs inside: the instance already running in this process, else a fresh local one (never a
    cluster some earlier `ray start` left, nor RAY_ADDRESS) or the cluster at `address`, shut down on leaving."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()


def _serve(cfg: Config, workers: int, out_dir: str | Path | None, resume: bool, progress: str,
           user: UserRun | None) -> dict:
    """Start the server and worker actors on the running Ray, watch them, return the server's summary."""
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    cfg_dict = cfg.to_dict()
    server_cls = ray.remote(num_cpus=0)(ParameterServer)
    worker_cls = ray.remote(num_cpus=0, max_restarts=cfg.ps.max_worker_restarts)(Worker)
    server = server_cls.options(max_concurrency=max(16, 4 * workers + 4)).remote()
    actors = []
    bar = Progress("off" if progress == "off" else "plain", 0)
    previous = _interrupt_on_sigterm()  # after ray.init, which installs a handler of its own
    try:
        try:  # input errors (a bad checkpoint, a user's model) surface here, as themselves
            ray.get(server.setup.remote(cfg_dict, str(out_dir) if out_dir else None, workers, resume, user))
        except (RayTaskError, RayActorError) as err:
            raise _unwrapped(err) from None
        fitting = server.fit.remote()
        actors = [worker_cls.remote(cfg_dict, m, workers, server, user) for m in range(workers)]
        pids = ray.get([a.pid.remote() for a in actors])
        running = {actors[m].run.remote(): m for m in range(workers)}
        restarts = [0] * workers

        def incarnation(m: int) -> int:
            """Wait until worker m answers again (Ray may still be restarting it); its process id."""
            deadline = time.perf_counter() + 120
            while True:
                try:
                    return ray.get(actors[m].pid.remote())
                except ActorDiedError:
                    raise RuntimeError(f"worker {m} died more than ps.max_worker_restarts="
                                       f"{cfg.ps.max_worker_restarts} times") from None
                except RayActorError:
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"worker {m} did not come back within 120 s") from None
                    time.sleep(0.2)

        while running:
            done, _ = ray.wait([*running, fitting], num_returns=1, timeout=2.0)
            if not done:
                continue
            if done[0] == fitting:  # the server's loop ended before its workers: it failed
                break
            m = running.pop(done[0])
            try:
                ray.get(done[0])
            except RayActorError:
                ray.get(server.leave.remote(m))
                pid = incarnation(m)
                if pid != pids[m]:
                    pids[m] = pid
                    restarts[m] += 1
                    bar.message(f"async: worker {m} died; Ray restarted it (restart {restarts[m]}), it rejoins")
                running[actors[m].run.remote()] = m
        server.conclude.remote(restarts)
        try:
            return ray.get(fitting)
        except RayTaskError as err:
            raise _unwrapped(err) from None
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)
        ray.kill(server, no_restart=True)
        if previous is not False:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
