"""Built-in callbacks that report: the progress bar, metrics.jsonl, TensorBoard, the train-loss window, the loss scale.

`TrainMetrics` writes a `kind: train` record every `log.every` steps and after
the last step: the mean loss since the last record (averaged over ranks), lr (and
`lr/NAME` for each parameter group when their rates differ), gradient norm,
throughput. A window a checkpoint splits is carried into the resumed run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from gradwise.io import write_text
from gradwise.train.callbacks.base import Callback, StepOutput
from gradwise.train.metrics import Progress, read_metrics, tensorboard_writer


class _HeldForOneFit(Callback):
    """A callback holding a file, writer or display (`held`) for one `fit` call, closed at its end or on an
    exception."""

    held: Any = None

    def close(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None

    def on_exception(self, trainer, error: BaseException) -> None:
        self.close()

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        self.close()


class ProgressBar(_HeldForOneFit):
    """A tqdm bar on a terminal, plain lines otherwise (`log.progress`); rank 0 only."""

    def on_fit_start(self, trainer) -> None:
        mode = trainer.cfg.log.progress if trainer.is_main else "off"
        self.held = Progress(mode, trainer.state.end, initial=trainer.state.step)
        if trainer.state.resumed_from is not None:
            trainer.message(f"resuming from step {trainer.state.step} of {trainer.state.end}")

    def on_step_end(self, trainer, out: StepOutput) -> None:
        self.held.advance()

    def on_log(self, trainer, record: dict[str, Any]) -> None:
        if record.get("kind") in ("train", "eval") and self.held is not None:
            self.held.show(record)

    def on_message(self, trainer, text: str) -> None:
        if self.held is not None:
            self.held.message(text)


class MetricsFile(_HeldForOneFit):
    """RUN_DIR/metrics.jsonl, one JSON record per line (rank 0). A resumed run first keeps only the records
    written before its checkpoint was (their count is in the checkpoint)."""

    def __init__(self):
        self.kept: list[dict[str, Any]] | None = None  # a resume's records, read when its checkpoint loads

    def on_fit_start(self, trainer) -> None:
        out = trainer.out_dir
        if out is None or not trainer.is_main:
            return
        path = out / "metrics.jsonl"
        if self.kept is not None and not trainer.records:  # the first fit of a resumed run
            write_text(path, "".join(json.dumps(r) + "\n" for r in self.kept))
            trainer.records[:0], self.kept = self.kept, None
        self.held = open(path, "a")

    def state_dict(self, trainer) -> dict[str, Any]:
        return {"records": len(trainer.records)}

    def load_state_dict(self, trainer, state: dict[str, Any] | None) -> None:
        """A resume reads its records here, before anything is written: a damaged metrics.jsonl refuses it."""
        if trainer.out_dir is not None and trainer.is_main and not trainer.records:
            self.kept = read_metrics(trainer.out_dir / "metrics.jsonl")[:(state or {}).get("records")]

    def on_log(self, trainer, record: dict[str, Any]) -> None:
        if self.held is not None:
            self.held.write(json.dumps(record) + "\n")
            self.held.flush()


class TensorBoard(_HeldForOneFit):
    """Mirrors every numeric field of every record as scalar `kind/key` at the record's step (RUN_DIR/tensorboard)."""

    def on_fit_start(self, trainer) -> None:
        if trainer.out_dir is not None and trainer.is_main:
            self.held = tensorboard_writer(trainer.out_dir / "tensorboard")

    def on_log(self, trainer, record: dict[str, Any]) -> None:
        if self.held is None or "step" not in record:
            return
        kind = record.get("kind", "metrics")
        for key, value in record.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.held.add_scalar(f"{kind}/{key}", value, record["step"])


class ScalerLog(Callback):
    """A `kind: scaler` record whenever the fp16 loss scale changes (overflow: halved; growth: doubled)."""

    def __init__(self):
        self.before: float | None = None

    def on_step_start(self, trainer) -> None:
        self.before = trainer.engine.precision.scale

    def on_step_end(self, trainer, out: StepOutput) -> None:
        scale = trainer.engine.precision.scale
        if scale is not None and scale != self.before:
            trainer.log({"kind": "scaler", "step": trainer.state.step, "scale": scale,
                         "event": "overflow" if scale < self.before else "growth"})


class CompileWarmup(Callback):
    """train.compile: the trainer's first step traces the model and generates code. Its wall time (a failed and
    retried first step included) goes into a `kind: compile` record and the summary's `compile_warmup_seconds`
    (this process's; a later fit of the same trainer reports the same figure: it is compiled already)."""

    def __init__(self):
        self.started: float | None = None
        self.seconds: float | None = None
        self.active = True

    def on_fit_start(self, trainer) -> None:
        self.active = trainer.source.computes_gradients  # a parameter server's workers compile, not the server
        if self.active and self.seconds is None:  # a later fit of the same trainer is already compiled
            trainer.message(f"train.compile: the first step compiles the model ({trainer.cfg.train.compile_backend})")

    def on_step_start(self, trainer) -> None:
        if self.started is None:  # kept across a first step that failed and was retried
            self.started = time.perf_counter()

    def on_step_end(self, trainer, out: StepOutput) -> None:
        if self.seconds is not None or not self.active:
            return
        self.seconds = time.perf_counter() - self.started
        trainer.log({"kind": "compile", "step": trainer.state.step, "warmup_seconds": round(self.seconds, 3)})
        trainer.message(f"compiled: the first step took {self.seconds:.1f} s")

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        if self.active:
            summary["compile_warmup_seconds"] = None if self.seconds is None else round(self.seconds, 3)


class TrainMetrics(Callback):
    """The train-loss window and the `kind: train` record every `log.every` steps and after the last."""

    def __init__(self):
        self.losses: list[Any] = []  # detached losses (or floats) since the last record
        self.lr = 0.0  # the rate the latest step used
        self.group_lrs: dict[str, float] | None = None  # each parameter group's, when they differ
        self.carry = (0.0, 0)  # (sum, count) of a window that a resume split
        self.window_start, self.window_samples = 0.0, 0

    def on_fit_start(self, trainer) -> None:
        self.window_start, self.window_samples = time.perf_counter(), 0

    def window(self, trainer) -> tuple[float, int]:
        """(sum, count) of the training losses since the last record (averaged over ranks: a collective)."""
        total, count = self.carry
        if self.losses:
            if isinstance(self.losses[0], torch.Tensor):
                window = torch.stack(self.losses).sum()
            else:
                window = torch.tensor(self.losses, dtype=torch.float64).sum()
            total += float(trainer.sync.all_reduce_sum(window.reshape(1))[0] / trainer.sync.world_size)
        return total, count + len(self.losses)

    def on_step_end(self, trainer, out: StepOutput) -> None:
        self.losses.append(out.loss)
        self.lr, self.group_lrs = out.lr, out.group_lrs
        self.window_samples += out.samples
        state = trainer.state
        if state.step % trainer.cfg.log.every == 0 or state.step == state.end:
            self.record(trainer, out.lr)

    def on_train_end(self, trainer) -> None:
        if self.losses:  # a run stopped early: the steps since the last record
            self.record(trainer, self.lr)

    def record(self, trainer, lr: float) -> None:
        now = time.perf_counter()
        total, count = self.window(trainer)
        state, engine = trainer.state, trainer.engine
        state.last_train_loss = total / count
        record = {
            "kind": "train", "step": state.step,
            "epoch": trainer.epochs_done(),
            "train_loss": state.last_train_loss,
            "lr": lr,
            **{f"lr/{name}": value for name, value in (self.group_lrs or {}).items()},
            "grad_norm": engine.grad_norm(),
            **engine.precision.metrics(),
            **({"penalty": float(engine.last_penalty)} if engine.last_penalty is not None else {}),
            "samples_per_s": self.window_samples / max(now - self.window_start, 1e-9),
            "time": round(trainer.wall_seconds(), 3),
            **trainer.source.record_fields(), **trainer.source.window_metrics(),
        }
        self.losses, self.carry = [], (0.0, 0)
        self.window_start, self.window_samples = now, 0
        trainer.log(record)

    def state_dict(self, trainer) -> dict[str, Any]:
        total, count = self.window(trainer)
        return {"loss": total, "steps": count}

    def load_state_dict(self, trainer, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.losses = []
        self.carry = (float(state.get("loss", 0.0)), int(state.get("steps", 0)))
