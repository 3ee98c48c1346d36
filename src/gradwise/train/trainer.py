"""The public facade: build a run (from a config, or from your own model and data), `fit` it, resume it.

The trainer composes the parts and runs the loop; it computes nothing itself:

    step engine   gradwise.train.step      gradients and updates (micro-batches, precision, clipping)
    sync          gradwise.parallel        nothing | DDP | FSDP (the parameter server composes the step itself)
    source        gradwise.train.source    where a step's gradients come from (batches; a server: pushes)
    callbacks     gradwise.train.callbacks metrics, evaluation, checkpoints, early stopping, health, progress
    data          gradwise.train.pipeline  datasets, collate functions, adopted DataLoaders

    summary = Trainer(model, train_set, test_data=test_set, loss_fn=F.cross_entropy, out_dir="runs/a").fit()
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gradwise.arguments import config_argument, fit_arguments, trainer_arguments
from gradwise.config import Config, validate
from gradwise.checkpoint.sharded import model_shapes
from gradwise.parallel.environment import environment_sync
from gradwise.parallel.strategy import GradientSync
from gradwise.errors import CheckpointError, ConfigError, UserInputError
from gradwise.io import read_json, write_json
from gradwise.resolve import resolve_config, run_length
from gradwise.train.callbacks import Callback, CallbackList, RunState, builtin_callbacks
from gradwise.train.checks import check_first_batch, checked_evaluation
from gradwise.train.batch import dataset_size
from gradwise.train.factories import config_data, config_loss, config_model
from gradwise.train.evaluation import evaluate, prepare_metrics, shares_evaluation
from gradwise.train.pipeline import adopt_settings, pipelines, report_adoption
from gradwise.train.planning import settle_plan
from gradwise.train.recovery import recover, reload_after_failure, resume_from
from gradwise.train.run_dir import RunLock, check_run_dir, describe_run, prepare_run_dir, resume_config
from gradwise.data.sampler import Position
from gradwise.train.source import BatchSteps, StreamSteps, check_same_launch
from gradwise.train.randomness import (EVAL, capture_rng, continue_training_stream, derived_seed, isolated_rng,
                                       restore_rng, seed_everything)
from gradwise.checkpoint.format import check_model_state
from gradwise.train.step import NonFiniteStep, StepEngine
from gradwise.train.summary import run_summary


class Trainer:
    """Trains `model` on `train_data` as the config says (docs/your_model.md shows every argument at work).

    Data are Datasets (map-style or streaming) or your DataLoaders (adopted: gradwise.train.pipeline), batched
    by `collate_fn`; early stopping watches `val_data`, never the test set. `optimizer` (or `optimizer(model)`),
    `scheduler` (or `scheduler(optimizer)`), `loss_fn`, `count_fn` (loss-bearing items) and `task` default to the
    config's and gradwise.train.batch's; `metrics={"name": fn or metric object}` adds `val_name`/`test_name`;
    `callbacks` run after the built-ins; `sync` is the strategy (one process, DDP under torchrun); `source` where
    steps come from; `out_dir=None` writes nothing. `config.seed` governs every random draw; memory.auto=true
    plans on your model (gradwise.train.planning). Every set's first batch is checked before anything runs.
    """

    def __init__(self, model: nn.Module, train_data: Dataset | DataLoader, *,
                 test_data: Dataset | DataLoader | None = None, val_data: Dataset | DataLoader | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 optimizer: torch.optim.Optimizer | Callable | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | Callable | None = None, config: Config | None = None,
                 out_dir: str | Path | None = None, task: str | None = None,
                 count_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, callbacks: list[Callback] = (),
                 sync: GradientSync | None = None, source: Any = None, configured: bool = False,
                 metrics: dict[str, Any] | None = None, collate_fn: Callable[[list], Any] | None = None):
        config = trainer_arguments(locals())  # every argument checked: a one-line error naming the bad one
        self.collate_fn = collate_fn
        self.data = pipelines(collate_fn, train=train_data, val=val_data, test=test_data)
        self.train_data, self.val_data, self.test_data = (p and p.dataset for p in self.data.values())
        self.train_size = dataset_size(self.train_data)  # None: a streaming dataset
        if self.train_size == 0:
            raise ConfigError("config error: the training set is empty")
        self.sync = sync or environment_sync(config.train.strategy)
        config = adopt_settings(config, self.data["train"], self.sync.world_size)  # a DataLoader's
        self.out_dir = Path(out_dir) if out_dir is not None else None
        config = settle_plan(config, model, self.data, self.sync, type(self).planner, self.out_dir, self.train_size,
                             task, loss_fn, count_fn)  # memory.auto=true: the recorded plan, or plan this model
        self.cfg = resolve_config(config, self.train_size)  # a no-op for an already resolved config
        self.is_main = self.sync.is_main
        self.total_steps = run_length(self.cfg, self.train_size)[1]
        self.source = source or (BatchSteps() if self.train_size is not None else StreamSteps())
        lr_factor = self.source.configure(self.cfg, self.sync.world_size)  # the source's checks, before any write
        self.engine = StepEngine(model, self.cfg, sync=self.sync, loss_fn=loss_fn, count_fn=count_fn,
                                 optimizer=optimizer, scheduler=scheduler, lr_factor=lr_factor,
                                 loss_scaling=self.source.computes_gradients)
        self.model = self.engine.model
        self.metrics = prepare_metrics(metrics, self.sync, shares_evaluation(self.sync, self.data))
        self.task = check_first_batch(self.engine, self.data, task, trains=self.source.computes_gradients,
                                      metrics=self.metrics)
        report_adoption(self.data, self.cfg, self.is_main)
        self.state = RunState()
        self.records: list[dict[str, Any]] = []  # this run's metrics records, as written to metrics.jsonl
        self.configured = configured  # data and model named by the config (from_config): config.yaml records them
        self.training_rng: dict[str, Any] | None = None  # where the training stream goes on (None: from the seed)
        self.interrupted = False  # a fit raised: its state is mid-step; fit(resume=True) reloads the checkpoint
        own = [self.source] if isinstance(self.source, Callback) else []
        self.callbacks = CallbackList([*own, *builtin_callbacks(self.cfg, self.task, self.val_data, self.metrics),
                                       *callbacks])
        self._session_start = time.perf_counter()

    # -- construction from config / run directory ---------------------------------------------------------

    planner: Callable[..., Config] | None = None  # memory.auto's (cfg, run=None); gradwise's own: set by the package

    @classmethod
    def from_config(cls, cfg: Config, out_dir: str | Path | None = None, sync: GradientSync | None = None,
                    planner: Callable[[Config], Config] | None = None, **kwargs) -> "Trainer":
        """A ready Trainer of the data and model the config names, built-in or yours by import path
        (gradwise.train.factories), seeded by `cfg.seed`; `kwargs` are Trainer's. Every rank resolves the config
        (`planner`, default `Trainer.planner`, plans a built-in model; yours is planned on by the Trainer) and
        trains with rank 0's resolution; every rank builds the same model."""
        cfg = config_argument("cfg", cfg)
        sync = sync or environment_sync(cfg.train.strategy)
        seed_everything(cfg.seed)
        data = config_data(cfg)
        if cfg.model.factory is None:  # the built-in model is built as planned; no rank waits on a collective
            resolved = resolve_config(cfg, len(data.train), planner=planner or cls.planner)  # while rank 0 plans
            cfg = validate(sync.broadcast(resolved.to_dict()))
        model = config_model(cfg, data)
        parts = dict(test_data=data.test, val_data=data.val, task=data.task, collate_fn=data.collate_fn,
                     loss_fn=config_loss(cfg))
        return cls(model, data.train, config=cfg, out_dir=out_dir, sync=sync, configured=True, **{**parts, **kwargs})

    resume_config = staticmethod(resume_config)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None, sync: GradientSync | None = None,
               **kwargs) -> "Trainer":
        """Rebuild the run in `run_dir` from its config.yaml and checkpoints/last.pt, ready to continue."""
        trainer = cls.from_config(resume_config(run_dir, overrides), out_dir=run_dir, sync=sync, **kwargs)
        trainer.restore(run_dir)
        return trainer

    def restore(self, run_dir: str | Path, finished_ok: bool = False) -> bool:
        """Continue the run in `run_dir` from its checkpoint, whatever moment it ended at; True: it is complete
        (only with `finished_ok`; otherwise an error). gradwise.train.recovery.resume_from."""
        return resume_from(self, run_dir, finished_ok)

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (a collective under data parallel: every rank must call it)."""
        model_state, optimizer_state = self.sync.state_dicts(self.model, self.engine.optimizer)
        s = self.state
        payload = {
            "model": model_state, "optimizer": optimizer_state, "scheduler": self.engine.scheduler.state_dict(),
            "step": s.step, "position": {"epoch": s.position.epoch, "batch": s.position.batch},
            "rng": self.sync.rank_states(capture_rng()),  # every process's, in rank order
            "scaler": self.engine.precision.state_dict(), "config": self.cfg.to_dict(),
            "progress": s.progress(self.wall_seconds()),
            "launch": dict(self.source.launch), "callbacks": self.callbacks.state_dicts(self),
        }
        self.callbacks.fire("on_checkpoint_save", self, payload)
        return payload

    def load_state_dict(self, payload: dict[str, Any], where: str = "checkpoint") -> None:
        engine, s = self.engine, self.state
        check_same_launch(payload.get("launch"), self.source.launch)
        self.sync.verify_checkpoint(payload)
        check_model_state(self.model, model_shapes(payload), where)
        try:
            self.sync.load_state_dicts(self.model, engine.optimizer, payload)
            engine.scheduler.load_state_dict(payload["scheduler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint error: '{where}' optimizer/scheduler state does not fit: {err}") \
                from None
        engine.precision.load_state_dict(payload.get("scaler"))
        s.step = int(payload["step"])
        s.position = Position(int(payload["position"]["epoch"]), int(payload["position"]["batch"]))
        s.load_progress(payload.get("progress", {}))
        self._session_start = time.perf_counter()
        ranks = payload["rng"]  # another number of processes: every one starts from rank 0's
        self.training_rng = ranks[self.sync.rank] if len(ranks) == self.sync.world_size else ranks[0]
        restore_rng(self.training_rng)
        s.resumed_from = s.step
        self.callbacks.load_state_dicts(self, payload.get("callbacks", {}))
        self.callbacks.fire("on_checkpoint_load", self, payload)

    def save_checkpoint(self) -> None:
        """Write checkpoints/last.pt (the strategy decides who writes; every rank must call this)."""
        if self.out_dir is not None:
            self.sync.save(self.out_dir / "checkpoints" / "last.pt", self.state_dict())

    # -- what callbacks call ---------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Record a metrics line (metrics.jsonl, TensorBoard, the progress bar and user callbacks see it)."""
        self.records.append(record)
        self.callbacks.fire("on_log", self, record)

    def message(self, text: str) -> None:
        self.callbacks.fire("on_message", self, text)

    def epochs_done(self) -> float:
        """Passes over the training set so far (a streaming dataset: completed passes)."""
        return round(self.state.samples_seen / self.train_size, 4) if self.train_size else \
            float(self.state.position.epoch)

    def wall_seconds(self) -> float:
        """Training wall time of the whole run so far, earlier sessions included."""
        return self.state.elapsed_seconds + time.perf_counter() - self._session_start

    def evaluate_all(self) -> dict[str, float]:
        """`val_*` figures (when there is a validation set) and `test_*` figures."""
        result = self.evaluate(self.data["val"], prefix="val") if self.data["val"] is not None else {}
        return {**result, **self.evaluate()}

    def evaluate(self, data: Dataset | DataLoader | None = None, prefix: str = "test") -> dict[str, float]:
        """Mean loss (and accuracy or bits-per-char, and `metrics`) over `data` (default: the test set), keys
        `prefix_*`. Evaluation draws from a stream of its own: it never moves the training RNG."""
        pipeline = self.data["test"] if data is None else checked_evaluation(self, data, prefix)
        if pipeline is None:
            return {}
        with isolated_rng(derived_seed(self.cfg.seed, EVAL)):
            result = evaluate(self.model, pipeline, self.engine.loss_fn, task=self.task, sync=self.sync,
                              batch_size=pipeline.batch_size or self.cfg.train.eval_batch_size, seed=self.cfg.seed,
                              prefix=prefix, count_fn=self.engine.count_fn, metrics=self.metrics)
        return self.sync.broadcast(result)  # every rank decides (early stopping) on rank 0's figures

    # -- the loop --------------------------------------------------------------------------------------------

    def prepare_out_dir(self) -> None:
        """Create the run directory and write config.yaml (rank 0); an existing run there is an error."""
        if self.out_dir is not None and self.is_main:  # fresh: not a resume, nor this trainer's next fit
            prepare_run_dir(self.out_dir, self.cfg, self.state.resumed_from is None and not self.records,
                            describe_run(self.model, self.train_data, self.train_size, self.configured))

    def fit(self, max_steps: int | None = None, resume: bool = False) -> dict[str, Any]:
        """Train until the run's last step (or step `max_steps`); returns the summary (also summary.json).

        `resume=True` first continues from `out_dir`'s checkpoint when there is one (exactly: weights,
        optimizer, schedule, data position, RNG), so a script run again picks up where it stopped (and,
        run again after it finished, returns the recorded summary).
        """
        fit_arguments(max_steps, resume)
        lock, undo = None, False
        if self.out_dir is not None and self.is_main:  # refusals first: a refused folder is left as it was
            check_run_dir(self.out_dir, fresh=not resume and self.state.resumed_from is None and not self.records)
            lock = RunLock(self.out_dir).acquire()
        try:
            return self._fit(max_steps, resume)
        except UserInputError:
            undo = True  # refused (a damaged run file met on resume): the lock file, folder, this fit made go again
            raise
        finally:
            if lock is not None:
                lock.release(undo)

    def _fit(self, max_steps: int | None, resume: bool) -> dict[str, Any]:
        if resume and self.out_dir is not None and (self.state.resumed_from is None or self.interrupted):
            if self.interrupted:  # a fit of this trainer raised: back to the last checkpoint, records included
                reload_after_failure(self)
            if self.restore(self.out_dir, finished_ok=True):
                return read_json(self.out_dir / "summary.json")  # run again after it finished: its summary
        self.prepare_out_dir()
        state = self.state
        state.end = state.step if state.finished else self.total_steps if max_steps is None else max_steps
        state.should_stop = state.finished = False
        self._session_start = time.perf_counter()
        self.model.train()
        continue_training_stream(self.training_rng, self.cfg.seed, self.sync.rank)  # whatever ran in between
        try:
            self.callbacks.fire("on_fit_start", self)
            while state.step < state.end and not state.should_stop:
                self.callbacks.fire("on_step_start", self)
                try:
                    out = self.source.next_step(self)
                except NonFiniteStep as event:
                    event.step = state.step + 1
                    recover(self, event)  # raises NonFiniteError, or rolls back to the last checkpoint
                    continue
                state.step += 1
                state.samples_seen += out.samples
                self.callbacks.fire("on_step_end", self, out)
            self.callbacks.fire("on_train_end", self)
        except BaseException as err:
            self.interrupted = True
            self.callbacks.fire("on_exception", self, err)
            raise
        finally:
            self.training_rng = capture_rng()
        state.elapsed_seconds, self._session_start = self.wall_seconds(), time.perf_counter()
        summary = self.summary()
        self.callbacks.fire("on_fit_end", self, summary)
        if self.out_dir is not None and self.is_main:
            write_json(self.out_dir / "summary.json", summary)
            if self.cfg.log.plots:
                from gradwise.train.plots import plot_run

                plot_run(self.records, self.out_dir / "plots")
        return summary

    def summary(self) -> dict[str, Any]:
        """The run's figures so far (summary.json's content): gradwise.train.summary."""
        return run_summary(self)
