"""Callbacks: the events of a run (see `base`) and the built-in callbacks that do everything periodic.

    from gradwise import Callback, Trainer

    class PrintLoss(Callback):
        def on_log(self, trainer, record):
            if record["kind"] == "train":
                print(record["step"], record["train_loss"])

    Trainer(model, data, callbacks=[PrintLoss()]).fit()
"""

from gradwise.config import Config
from gradwise.train.callbacks.base import (
    EVENTS,
    Callback,
    CallbackList,
    RunState,
    StepOutput,
)
from gradwise.train.callbacks.cadence import (
    Checkpointer,
    EarlyStop,
    Evaluator,
    GradientHealth,
)
from gradwise.train.callbacks.records import (
    CompileWarmup,
    MetricsFile,
    ProgressBar,
    ScalerLog,
    TensorBoard,
    TrainMetrics,
)


def builtin_callbacks(cfg: Config, task: str, val_data, metrics: dict | None = None) -> list[Callback]:
    """The built-in callbacks a config asks for, in their fixed order."""
    callbacks: list[Callback] = [ProgressBar(), MetricsFile()]
    if cfg.log.tensorboard:
        callbacks.append(TensorBoard())
    callbacks.append(ScalerLog())
    if cfg.train.compile:
        callbacks.append(CompileWarmup())
    if cfg.diagnostics.every:
        callbacks.append(GradientHealth())
    callbacks += [TrainMetrics(), Evaluator(), Checkpointer()]
    if cfg.early_stopping.patience is not None:
        callbacks.append(EarlyStop(cfg, task, val_data, metrics))
    return callbacks


__all__ = ["EVENTS", "Callback", "CallbackList", "RunState", "StepOutput", "builtin_callbacks", "Checkpointer",
           "CompileWarmup", "EarlyStop", "Evaluator", "GradientHealth", "MetricsFile", "ProgressBar", "ScalerLog",
           "TensorBoard", "TrainMetrics"]
