"""The parameter server's side: a Trainer whose steps are gradients its workers push.

The server actor runs `Trainer.fit` (the same loop and callbacks as single-process
training: metrics, evaluation, checkpoints, early stopping, gradient health,
TensorBoard) with `PushedGradients` as its step source: each step waits for the
next pushed gradient, corrects it by the update rule (gradwise.optim.async_rules)
and applies it with the step engine's `update`. Pulls and pushes arrive on
other actor threads; the fit thread holds the lock except while it waits for a
push, so a pull never sees a half-applied update or a running evaluation.

Bookkeeping that keeps the run honest:
- Budget: `train.steps` counts gradients. A pull hands out a ticket while
  tickets remain; a worker that dies holding one gives it back, so exactly
  `train.steps` gradients are applied (ssgd: `steps / M` updates of M).
- Exactly once: a push carries the worker's clock from its pull and is accepted
  only if it answers that pull; a retry or a zombie push is dropped.
- Buffers: a push carries what the worker's forward did to the model's buffers
  (BatchNorm's running statistics), folded into the server's model as a single
  process would have updated them (gradwise.asynchronous.buffers).
- Staleness: updates applied between a worker's pull and its push, logged per
  gradient (updates.jsonl) with the clocks, so SSP's bound can be checked.
- SSP: a pull waits while the worker's clock is more than `ps.staleness` ahead
  of the slowest live worker's (s = 0: lockstep).
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any

import torch

from gradwise.asynchronous.buffers import fold_buffers
from gradwise.config import Config
from gradwise.io import read_jsonl, write_text
from gradwise.optim.async_rules import apply_rule, async_lr_factor, mean_square_key, rule_lambda, staleness_stats
from gradwise.train.callbacks import StepOutput
from gradwise.train.source import StepSource
from gradwise.train.step import NonFiniteStep, group_lrs

UPDATE_LOG = "updates.jsonl"


class PushedGradients(StepSource):
    """The server's step source and its protocol state (checkpointed under the payload's "ps" key). It meets
    its trainer when the fit starts (pulls wait for that)."""

    computes_gradients = False  # its gradients arrive unscaled from the workers: no loss scaler here

    def __init__(self, cfg: Config, workers: int):
        self.cfg, self.workers, self.rule = cfg, workers, cfg.ps.rule
        self.lam = rule_lambda(self.rule, cfg.ps.dc_lambda)
        self.cond = threading.Condition()
        self.trainer = None  # the server's trainer, from the start of its fit
        self.params: list[torch.Tensor] = []
        self.budget = 0
        self.rule_state: dict[str, Any] = {}
        self.version = 0  # updates applied
        self.tickets = 0  # gradients handed out
        self.clocks = [0] * workers  # gradients applied per worker
        self.positions: list[dict | None] = [None] * workers  # each worker's data position after its last push
        self.live: set[int] = set()
        self.outstanding: dict[int, dict] = {}  # worker -> {version, clock, backup, slowest_clock} of its pull
        self.queue: collections.deque[dict] = collections.deque()  # accepted pushes waiting to be applied
        self.round: list[list[torch.Tensor]] = []  # ssgd: gradients of the current round
        self.staleness: list[int] = []
        self.window: list[int] = []  # staleness since the last train record
        self.samples = [0] * workers
        self.compute_seconds = [0.0] * workers
        self.failure: tuple[str | None, str] | None = None  # a worker's non-finite step
        self.closed = False
        self.restarts: list[int] | None = None  # set by the driver when every worker is done
        self.update_log = None

    def configure(self, cfg: Config, world_size: int) -> float:
        return async_lr_factor(cfg.ps.rule, cfg.ps.lr_scale, self.workers)

    # -- the workers' calls (other threads) ---------------------------------------------------------------------

    def join(self, worker: int) -> dict:
        """A worker (new or restarted) joins: its clock (caught up to the slowest live one) and data position."""
        with self.cond:
            others = [self.clocks[w] for w in self.live if w != worker]
            if self.rule == "ssgd":  # join the round in progress
                self.clocks[worker] = self.version
            elif others:
                self.clocks[worker] = max(self.clocks[worker], min(others))
            self.live.add(worker)
            self.cond.notify_all()
            return {"clock": self.clocks[worker], "position": self.positions[worker]}

    def leave(self, worker: int) -> None:
        """A worker died: its ticket (a pull never pushed) returns to the pool."""
        with self.cond:
            self.live.discard(worker)
            self._return_ticket(worker)

    def drop(self, worker: int) -> None:
        """The worker discards the gradient of its current pull (an fp16 overflow): the ticket returns."""
        with self.cond:
            self._return_ticket(worker)

    def fail(self, worker: int, where: str | None, stage: str) -> None:
        """The worker met a non-finite loss or gradient: the run stops (diagnostics.on_nonfinite=stop)."""
        with self.cond:
            self.failure = (f"{where} (worker {worker})", stage)
            self.cond.notify_all()

    def _return_ticket(self, worker: int) -> None:
        if self.outstanding.pop(worker, None) is not None:
            self.tickets -= 1
        self.cond.notify_all()

    def _spent(self) -> bool:
        return self.closed or self.tickets >= self.budget

    def _may_start(self, worker: int) -> bool:
        if self.queue:  # a pushed gradient is about to be applied: pull after it
            return False
        if self.rule not in ("ssp", "ssgd"):
            return True
        bound = 0 if self.rule == "ssgd" else self.cfg.ps.staleness
        slowest = min(self.clocks[w] for w in self.live) if self.live else self.clocks[worker]
        if self.clocks[worker] - slowest > bound:
            return False
        return self.rule != "ssgd" or self.version == self.clocks[worker]  # ssgd: the previous round is applied

    def pull(self, worker: int) -> dict | None:
        """Current weights for `worker`'s next gradient, or None when the budget is spent (waits under SSP)."""
        with self.cond:
            self.cond.wait_for(lambda: self.trainer is not None and (self._spent() or self._may_start(worker)))
            if self._spent():
                return None
            self.tickets += 1
            backup = [p.detach().clone() for p in self.params] if self.rule.startswith("dcasgd") else None
            slowest = min((self.clocks[w] for w in self.live), default=self.clocks[worker])
            self.outstanding[worker] = {"version": self.version, "clock": self.clocks[worker], "backup": backup,
                                        "slowest_clock": slowest}
            state = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
            return {"state": state, "version": self.version, "clock": self.clocks[worker]}

    def push(self, worker: int, clock: int, grads: list[torch.Tensor], loss: float, position: dict,
             samples: int, compute_seconds: float, buffers: dict | None = None) -> bool:
        """Hand one gradient (and what its forward did to the buffers) to the fit loop and wait until it is
        applied; False if it answers no current pull."""
        with self.cond:
            pulled = self.outstanding.get(worker)
            if self.closed or pulled is None or clock != self.clocks[worker] or pulled["clock"] != clock:
                return False  # a duplicate, a push from before a restart, or the run has ended
            del self.outstanding[worker]
            item = {"worker": worker, "clock": clock, "pulled": pulled, "grads": grads, "buffers": buffers or {},
                    "loss": loss,
                    "position": position, "samples": samples, "compute_seconds": compute_seconds, "done": False}
            self.queue.append(item)
            self.cond.notify_all()
            self.cond.wait_for(lambda: item["done"])
            return item["applied"]

    # -- the fit loop's side (the thread running Trainer.fit, holding the lock) --------------------------------

    def next_step(self, trainer) -> StepOutput:
        while True:
            self.cond.wait_for(lambda: self.queue or self.failure is not None or self._round_complete())
            if self.failure is not None:
                raise NonFiniteStep(*self.failure)
            if self.queue:
                break
            self._apply_round()  # ssgd: a worker left mid-round; the others' gradients make the round
        item = self.queue.popleft()
        worker, pulled = item["worker"], item["pulled"]
        staleness = self.version - pulled["version"]
        grads = [g.to(p.device, torch.float32) for g, p in zip(item["grads"], self.params)]
        optimizer = trainer.engine.optimizer
        lr, lrs = optimizer.param_groups[0]["lr"], group_lrs(optimizer)
        fold_buffers(trainer.model, item["buffers"])  # BatchNorm statistics: the worker's batch folded in
        if self.rule == "ssgd":
            self.round.append(grads)
            if self._round_complete() or trainer.state.step + 1 >= self.budget:
                self._apply_round()
        else:
            weights = [p.detach() for p in self.params]
            self._apply(apply_rule(self.rule, grads, weights, pulled["backup"], staleness, self.rule_state,
                                   self.lam, self.cfg.ps.ms_momentum, self.cfg.ps.eps,
                                   mean_square_key(self.cfg.ps.mean_square == "per-worker", worker)))
        self.clocks[worker] += 1
        self.positions[worker] = item["position"]
        self.samples[worker] += item["samples"]
        self.compute_seconds[worker] += item["compute_seconds"]
        self.staleness.append(staleness)
        self.window.append(staleness)
        if self.update_log is not None:
            self.update_log.write(json.dumps({
                "update": self.version, "gradient": trainer.state.step + 1, "worker": worker, "clock": item["clock"],
                "pulled_version": pulled["version"], "staleness": staleness,
                "slowest_clock_at_pull": pulled["slowest_clock"]}) + "\n")
        item["done"], item["applied"] = True, True
        self.cond.notify_all()
        return StepOutput(item["loss"], item["samples"], lr, lrs)

    def _round_complete(self) -> bool:
        return self.rule == "ssgd" and bool(self.round) and len(self.round) >= len(self.live)

    def _apply_round(self) -> None:
        mean = [torch.stack(gs).mean(0) for gs in zip(*self.round)]
        self.round = []
        self._apply(mean)

    def _apply(self, grads: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g
        self.trainer.engine.update()
        self.version += 1

    def record_fields(self) -> dict[str, Any]:
        return {"updates": self.version}

    def window_metrics(self) -> dict[str, Any]:
        window, self.window = self.window, []
        return {**staleness_stats(window), "worker_samples_per_s": self._worker_throughput()}

    def _worker_throughput(self) -> list[float]:
        return [round(s / t, 1) if t > 0 else 0.0 for s, t in zip(self.samples, self.compute_seconds)]

    def close(self) -> None:
        """No more tickets; pushes still queued are refused (the workers' pulls return None)."""
        self.closed = True
        for item in self.queue:
            item["done"], item["applied"] = True, False
        self.queue.clear()
        self.cond.notify_all()

    # -- events --------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer) -> None:
        self.cond.acquire()
        self.trainer, self.params, self.budget = trainer, trainer.engine.params, trainer.total_steps
        self.cond.notify_all()
        if trainer.out_dir is not None:
            self.update_log = open(trainer.out_dir / UPDATE_LOG, "a")

    @property
    def launch(self) -> dict[str, Any]:
        return {"strategy": "async", "workers": self.workers}

    def state_dict(self, trainer) -> dict[str, Any]:
        if self.update_log is not None:
            self.update_log.flush()
        return {"version": self.version, "applied": trainer.state.step, "clocks": self.clocks,
                "positions": self.positions, "staleness": self.staleness, "rule_state": self.rule_state}

    def load_state_dict(self, trainer, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.version, self.tickets, self.clocks = int(state["version"]), int(state["applied"]), list(state["clocks"])
        self.positions, self.staleness = list(state["positions"]), list(state["staleness"])
        self.rule_state = state.get("rule_state") or {}
        log = trainer.out_dir / UPDATE_LOG
        kept = [r for r in (read_jsonl(log) if log.exists() else []) if r.get("gradient", 0) <= self.tickets]
        write_text(log, "".join(json.dumps(r) + "\n" for r in kept))  # drop what the crash lost

    def on_exception(self, trainer, error: BaseException) -> None:
        self.close()
        self._finish()

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        self.close()
        self.cond.wait_for(lambda: self.restarts is not None)  # the driver: every worker has returned
        summary.update({
            "strategy": "async", "rule": self.rule, "workers": self.workers, "updates": self.version,
            "gradients": trainer.state.step,
            **staleness_stats(self.staleness, histogram=True),
            "worker_samples_per_s": self._worker_throughput(), "worker_restarts": self.restarts,
        })
        self._finish()

    def conclude(self, restarts: list[int]) -> None:
        """The driver's word that every worker has returned, with how often each was restarted."""
        with self.cond:
            self.restarts = list(restarts)
            self.cond.notify_all()

    def _finish(self) -> None:
        if self.update_log is not None:
            self.update_log.close()
            self.update_log = None
        self.cond.release()
