"""Asynchronous parameter server on Ray: one server actor, M worker actors (`--strategy async`).

The server owns the fp32 weights, the optimizer and schedule, the update rule
and its state (gradwise.optim.async_rules), evaluation, metrics and
checkpoints; it is a `Trainer` that never runs `fit`, only `apply_update`.
Each worker owns a shard of the training data and a `Trainer` of its own used
for `compute_gradients` alone (the single-process code path: micro-batches,
precision, loss scaling), and loops: pull weights, compute a gradient on its
next batch, push it.

Bookkeeping that keeps the run honest:
- Budget: `train.steps` counts gradient computations. A pull hands out a ticket
  while tickets remain; a worker that dies holding one gives it back, so
  exactly `train.steps` gradients are applied (ssgd: `steps / M` updates of M).
- Exactly once: a push carries the worker's clock from its pull and is applied
  only if it is that worker's next clock; a retry or a zombie push is dropped.
- Staleness: updates applied between a worker's pull and its push, logged per
  update (updates.jsonl) with the clocks, so SSP's bound can be checked.
- SSP: a pull waits while the worker's clock is more than `ps.staleness` ahead
  of the slowest live worker's (s = 0: lockstep).
- Faults: Ray restarts a dead worker actor (up to `ps.max_worker_restarts`);
  the driver tells the server it left (its ticket returns), calls `run` on the
  new actor, and it rejoins with the server's current weights.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from gradwise.config import Config, validate
from gradwise.errors import CheckpointError, ConfigError
from gradwise.io import write_text
from gradwise.optim.async_rules import DEFAULT_LAMBDA

UPDATE_LOG = "updates.jsonl"


def worker_shard(n: int, worker: int, workers: int) -> torch.Tensor:
    """Rows of the training set worker `worker` owns: every M-th row (all rows, in order, for one worker)."""
    return torch.arange(worker, n, workers)


class ParameterServer:
    """The server actor's logic (wrapped by `ray.remote` in `train_async`)."""

    def __init__(self, cfg_dict: dict, out_dir: str | None, workers: int, resume: bool = False):
        from gradwise.train import Trainer
        from gradwise.train.metrics import MetricsLog
        from gradwise.train.state import load_checkpoint

        cfg = validate(cfg_dict)
        self.cfg, self.workers = cfg, workers
        self.rule = cfg.ps.rule
        self.budget = cfg.train.steps if cfg.train.steps is not None else None
        if self.rule == "ssgd" and cfg.schedule.total_steps is None and self.budget is not None:
            cfg.schedule.total_steps = max(1, self.budget // workers)  # the schedule counts updates, M gradients each
        self.trainer = Trainer.from_config(cfg, out_dir=out_dir)
        if self.budget is None:  # train.epochs passes over the whole training set, counted in gradients
            self.budget = cfg.train.epochs * self.trainer.steps_per_epoch
        self.params = self.trainer.params
        self.out = Path(out_dir) if out_dir else None
        self.lam = cfg.ps.dc_lambda if cfg.ps.dc_lambda is not None else DEFAULT_LAMBDA.get(self.rule, 0.0)
        self.rule_state: dict[str, Any] = {}
        self.version = 0  # updates applied
        self.applied = 0  # gradients applied (= tickets redeemed)
        self.tickets = 0  # gradients handed out
        self.clocks = [0] * workers  # pushes applied per worker
        self.positions: list[dict | None] = [None] * workers  # each worker's data position after its last push
        self.live: set[int] = set()
        self.outstanding: dict[int, dict] = {}  # worker -> {version, clock, backup} of its current pull
        self.round: list[list[torch.Tensor]] = []  # ssgd: gradients of the current round
        self.staleness: list[int] = []
        self.window: list[dict] = []
        self.samples = [0] * workers
        self.compute_seconds = [0.0] * workers
        self.last_eval: dict[str, float] = {}
        self.started = time.perf_counter()
        self.condition = asyncio.Condition()
        if resume:
            payload = load_checkpoint(self.out / "checkpoints" / "last.pt")
            self.trainer.load_state_dict(payload, where=str(self.out / "checkpoints" / "last.pt"))
            ps = payload.get("ps") or {}
            if ps.get("workers") != workers:
                raise ConfigError(f"config error: the run was started with {ps.get('workers')} workers; "
                                  f"resume it with --workers {ps.get('workers')}")
            self.version, self.applied = int(ps["version"]), int(ps["applied"])
            self.tickets, self.clocks = self.applied, list(ps["clocks"])
            self.positions, self.staleness = list(ps["positions"]), list(ps["staleness"])
            self.rule_state = ps.get("rule_state") or {}
            kept = [line for line in (self.out / UPDATE_LOG).read_text().splitlines()
                    if json.loads(line)["gradient"] <= self.applied] if (self.out / UPDATE_LOG).exists() else []
            write_text(self.out / UPDATE_LOG, "".join(line + "\n" for line in kept))  # drop what the crash lost
        else:
            self.trainer.prepare_out_dir()
        self.metrics = MetricsLog(self.out / "metrics.jsonl" if self.out else None,
                                  resume_step=self.applied if resume else None)
        self.update_log = open(self.out / UPDATE_LOG, "a") if self.out else None

    # -- membership ---------------------------------------------------------------------------------------------

    async def join(self, worker: int) -> dict:
        """A worker (new or restarted) joins: its clock (caught up to the slowest live one) and data position."""
        async with self.condition:
            others = [self.clocks[w] for w in self.live if w != worker]
            if others:
                self.clocks[worker] = max(self.clocks[worker], min(others))
            self.live.add(worker)
            self.condition.notify_all()
            return {"clock": self.clocks[worker], "position": self.positions[worker]}

    async def leave(self, worker: int) -> None:
        """A worker died: its ticket (a pull never pushed) returns to the pool."""
        async with self.condition:
            self.live.discard(worker)
            self._return_ticket(worker)

    async def drop(self, worker: int) -> None:
        """The worker discards the gradient of its current pull (an fp16 overflow): the ticket returns."""
        async with self.condition:
            self._return_ticket(worker)

    def _return_ticket(self, worker: int) -> None:
        if self.outstanding.pop(worker, None) is not None:
            self.tickets -= 1
        self.condition.notify_all()

    # -- the protocol -------------------------------------------------------------------------------------------

    def _may_start(self, worker: int) -> bool:
        if self.rule not in ("ssp", "ssgd"):
            return True
        bound = 0 if self.rule == "ssgd" else self.cfg.ps.staleness
        slowest = min(self.clocks[w] for w in self.live) if self.live else self.clocks[worker]
        if self.clocks[worker] - slowest > bound:
            return False
        return self.rule != "ssgd" or self.version == self.clocks[worker]  # ssgd: the previous round is applied

    async def pull(self, worker: int) -> dict | None:
        """Current weights for `worker`'s next gradient, or None when the budget is spent (waits under SSP)."""
        async with self.condition:
            await self.condition.wait_for(lambda: self.tickets >= self.budget or self._may_start(worker))
            if self.tickets >= self.budget:
                return None
            self.tickets += 1
            backup = [p.detach().clone() for p in self.params] if self.rule.startswith("dcasgd") else None
            slowest = min((self.clocks[w] for w in self.live), default=self.clocks[worker])
            self.outstanding[worker] = {"version": self.version, "clock": self.clocks[worker], "backup": backup,
                                        "slowest_clock": slowest}
            state = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
            return {"state": state, "version": self.version, "clock": self.clocks[worker]}

    async def push(self, worker: int, clock: int, grads: list[torch.Tensor], loss: float, position: dict,
                   samples: int, compute_seconds: float) -> bool:
        """Apply (or, for ssgd, collect) one gradient; False if it was not this worker's next clock."""
        async with self.condition:
            pulled = self.outstanding.get(worker)
            if pulled is None or clock != self.clocks[worker] or pulled["clock"] != clock:
                return False  # a duplicate or a push from before a restart
            del self.outstanding[worker]
            staleness = self.version - pulled["version"]
            grads = [g.to(p.device, torch.float32) for g, p in zip(grads, self.params)]
            if self.rule == "ssgd":
                self.round.append(grads)
                if len(self.round) >= len(self.live) or self.applied + 1 >= self.budget:
                    mean = [torch.stack(gs).mean(0) for gs in zip(*self.round)]
                    self.round = []
                    self._apply(mean)
            else:
                from gradwise.optim.async_rules import apply_rule

                weights = [p.detach() for p in self.params]
                corrected = apply_rule(self.rule, grads, weights, pulled["backup"], staleness, self.rule_state,
                                       self.lam, self.cfg.ps.ms_momentum, self.cfg.ps.eps)
                self._apply(corrected)
            self.applied += 1
            self.clocks[worker] += 1
            self.positions[worker] = position
            self.samples[worker] += samples
            self.compute_seconds[worker] += compute_seconds
            self.staleness.append(staleness)
            record = {"update": self.version, "gradient": self.applied, "worker": worker, "clock": clock,
                      "pulled_version": pulled["version"], "staleness": staleness,
                      "slowest_clock_at_pull": pulled["slowest_clock"]}
            if self.update_log is not None:
                self.update_log.write(json.dumps(record) + "\n")
            self.window.append({"loss": loss, "staleness": staleness})
            self._after_gradient()
            self.condition.notify_all()
            return True

    def _apply(self, grads: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g
        self.trainer.apply_update()
        self.version += 1
        self.trainer.step = self.version

    # -- metrics, evaluation, checkpoints -----------------------------------------------------------------------

    def _after_gradient(self) -> None:
        cfg, done = self.cfg, self.applied >= self.budget
        if self.applied % cfg.log.every == 0 or done:
            self.trainer.last_train_loss = statistics.fmean(r["loss"] for r in self.window)
            record = {"kind": "train", "step": self.applied, "updates": self.version,
                      "train_loss": self.trainer.last_train_loss,
                      "staleness_mean": statistics.fmean(r["staleness"] for r in self.window),
                      "staleness_max": max(r["staleness"] for r in self.window),
                      "lr": self.trainer.optimizer.param_groups[0]["lr"],
                      "worker_samples_per_s": self._worker_throughput(),
                      "time": round(time.perf_counter() - self.started + self.trainer.elapsed_seconds, 3)}
            self.window = []
            self.metrics.write(record)
        if self.applied % cfg.train.eval_every == 0 or done:
            self.last_eval = self.trainer.evaluate_all()
            if self.last_eval:
                self.metrics.write({"kind": "eval", "step": self.applied, "updates": self.version,
                                    "time": round(time.perf_counter() - self.started + self.trainer.elapsed_seconds, 3),
                                    **self.last_eval})
        if self.applied % cfg.train.checkpoint_every == 0 or done:
            self.save_checkpoint()

    def _worker_throughput(self) -> list[float]:
        return [round(s / t, 1) if t > 0 else 0.0 for s, t in zip(self.samples, self.compute_seconds)]

    def save_checkpoint(self) -> None:
        if self.out is None:
            return
        from gradwise.train.state import save_checkpoint

        payload = self.trainer.state_dict()
        payload["ps"] = {"workers": self.workers, "version": self.version, "applied": self.applied,
                         "clocks": self.clocks, "positions": self.positions, "staleness": self.staleness,
                         "rule_state": self.rule_state}
        if self.update_log is not None:
            self.update_log.flush()
        save_checkpoint(self.out / "checkpoints" / "last.pt", payload)

    async def status(self) -> dict:
        return {"applied": self.applied, "budget": self.budget, "updates": self.version,
                "train_loss": self.trainer.last_train_loss, **self.last_eval}

    async def finish(self, worker_restarts: list[int]) -> dict:
        """The run's summary (also summary.json and plots): final evaluation from the server's weights."""
        from gradwise.io import write_json

        self.trainer.elapsed_seconds += time.perf_counter() - self.started
        self.started = time.perf_counter()
        self.trainer.samples_seen = sum(self.samples)
        summary = self.trainer.summary(self.last_eval or self.trainer.evaluate_all())
        counts: dict[int, int] = {}
        for s in self.staleness:
            counts[s] = counts.get(s, 0) + 1
        summary.update({
            "strategy": "async", "rule": self.rule, "workers": self.workers, "updates": self.version,
            "gradients": self.applied, "steps": self.applied,
            "staleness_mean": statistics.fmean(self.staleness) if self.staleness else 0.0,
            "staleness_max": max(self.staleness, default=0),
            "staleness_histogram": {str(k): counts[k] for k in sorted(counts)},
            "worker_samples_per_s": self._worker_throughput(), "worker_restarts": worker_restarts,
        })
        if self.update_log is not None:
            self.update_log.close()
            self.update_log = None
        self.metrics.close()
        if self.out is not None:
            write_json(self.out / "summary.json", summary)
            if self.cfg.log.plots:
                from gradwise.train.plots import plot_run

                plot_run(self.metrics.records, self.out / "plots")
        return summary


class Worker:
    """A worker actor's logic: its data shard, its own Trainer for `compute_gradients`, the pull/push loop."""

    def __init__(self, cfg_dict: dict, worker: int, workers: int, server: Any):
        from gradwise.data import build_data
        from gradwise.nn import build_model
        from gradwise.train import Trainer, seed_everything

        cfg = validate(cfg_dict)
        self.cfg, self.worker, self.server = cfg, worker, server
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # M workers share the cores
        seed_everything(cfg.seed + worker)
        data = build_data(cfg.data, context=cfg.model.context)
        rows = worker_shard(len(data.train), worker, workers)
        shard = TensorDataset(*(t[rows] for t in data.train.tensors))
        model = build_model(cfg.model, data.input_shape, data.num_classes, data.task)
        self.trainer = Trainer(model, shard, config=cfg, task=data.task)
        self.slowdown = cfg.ps.slowdowns().get(worker, 1.0)

    def pid(self) -> int:
        """This incarnation's process id (a restarted actor has a new one)."""
        return os.getpid()

    def run(self) -> int:
        """Pull, compute, push until the server's budget is spent; returns the gradients this call pushed."""
        import ray

        from gradwise.train.sampler import EpochBatches, Position
        from gradwise.train.trainer import fetch_batch

        cfg, trainer = self.cfg, self.trainer
        joined = ray.get(self.server.join.remote(self.worker))
        start = joined["position"] or {"epoch": 0, "batch": 0}
        batches = EpochBatches(len(trainer.train_data), cfg.train.batch_size, cfg.seed + self.worker,
                               cfg.train.drop_last, Position(start["epoch"], start["batch"]))
        pushed = 0
        while True:
            pulled = ray.get(self.server.pull.remote(self.worker))
            if pulled is None:
                return pushed
            trainer.model.load_state_dict(pulled["state"])
            t0 = time.perf_counter()
            idx = batches.next()
            inputs, targets = (t.to(trainer.device) for t in fetch_batch(trainer.train_data, idx))
            trainer.optimizer.zero_grad(set_to_none=True)
            loss = trainer.compute_gradients(inputs, targets)
            if trainer.scaler is not None:
                finite = trainer.scaler.unscale_(trainer.params)
                trainer.scaler.update(not finite)
                if not finite:  # an fp16 overflow: this gradient is unusable; the ticket goes back unused
                    ray.get(self.server.drop.remote(self.worker))
                    continue
            grads = [p.grad.detach().to("cpu", torch.float32).clone() if p.grad is not None else torch.zeros_like(p)
                     for p in trainer.params]
            elapsed = time.perf_counter() - t0
            if self.slowdown > 1:  # a simulated straggler: each gradient takes `slowdown` times as long
                time.sleep(elapsed * (self.slowdown - 1))
                elapsed *= self.slowdown
            position = {"epoch": batches.position.epoch, "batch": batches.position.batch}
            applied = ray.get(self.server.push.remote(self.worker, pulled["clock"], grads, float(loss), position,
                                                      len(idx), elapsed))
            pushed += int(applied)


def _check_async_config(cfg: Config, workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"usage error: --workers={workers} must be at least 1")
    slow = [w for w in cfg.ps.slowdowns() if w >= workers]
    if slow:
        raise ConfigError(f"config error: ps.slowdown={cfg.ps.slowdown} names worker {slow[0]}, but workers are "
                          f"numbered 0..{workers - 1}")
    if cfg.early_stopping.patience is not None:
        raise ConfigError("config error: early_stopping is not supported with --strategy async")


def train_async(cfg: Config, workers: int, out_dir: str | Path | None, ray_address: str | None = None,
                resume: bool = False, progress: str = "auto") -> dict:
    """Run the parameter server and `workers` workers on Ray until the budget is spent; returns the summary."""
    try:
        import ray
        from ray.exceptions import ActorDiedError, RayActorError
    except ImportError:
        raise ConfigError("config error: --strategy async needs Ray: pip install 'gradwise[async]'") from None

    from gradwise.train.metrics import Progress

    _check_async_config(cfg, workers)
    from gradwise.train.trainer import holds_run

    if out_dir is not None and not resume and holds_run(Path(out_dir)):
        raise CheckpointError(f"checkpoint error: '{out_dir}' already holds a run; pass --resume {out_dir} "
                              "to continue it or choose another --out")
    if out_dir is not None and resume and not (Path(out_dir) / "checkpoints" / "last.pt").is_file():
        raise CheckpointError(f"checkpoint error: '{out_dir}' has no checkpoints/last.pt to resume from")
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True)
    cfg_dict = cfg.to_dict()
    server_cls = ray.remote(num_cpus=0)(ParameterServer)
    worker_cls = ray.remote(num_cpus=0, max_restarts=cfg.ps.max_worker_restarts)(Worker)
    server = server_cls.options(max_concurrency=max(16, 4 * workers)).remote(
        cfg_dict, str(out_dir) if out_dir else None, workers, resume)
    ray.get(server.status.remote())  # surfaces construction errors (bad checkpoint, existing run) here
    actors = [worker_cls.remote(cfg_dict, m, workers, server) for m in range(workers)]
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

    bar = Progress("off" if progress == "off" else "plain", 0)
    last_report = time.perf_counter()
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
            if not done:
                if time.perf_counter() - last_report > 10:
                    s = ray.get(server.status.remote())
                    bar.message(f"async: {s['applied']}/{s['budget']} gradients, {s['updates']} updates, "
                                f"train_loss {s['train_loss']:.4g}")
                    last_report = time.perf_counter()
                continue
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
        return ray.get(server.finish.remote(restarts))
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)
        ray.kill(server, no_restart=True)
