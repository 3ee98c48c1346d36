"""A custom callback: log the gradient norm's running maximum and stop when the loss reaches a target.

Run it (about ten seconds on 2 CPU cores):

    python examples/custom_callback.py

It trains the built-in CNN on MNIST-1D with a user callback that sees every
metrics record (`on_log`), adds its own figures to metrics.jsonl and to the
summary, keeps its state in checkpoints, and ends the run early.
"""

from __future__ import annotations

import tempfile

from gradwise import Callback, Trainer, load_config


class LossTarget(Callback):
    """Stops once the logged training loss falls below `target`; records the largest gradient norm seen."""

    def __init__(self, target: float):
        self.target = target
        self.max_grad_norm = 0.0

    def on_log(self, trainer, record):
        if record["kind"] != "train":
            return
        self.max_grad_norm = max(self.max_grad_norm, record["grad_norm"])
        if record["train_loss"] < self.target and not trainer.state.should_stop:
            trainer.message(f"loss target {self.target} reached at step {record['step']}")
            trainer.log({"kind": "target", "step": record["step"], "max_grad_norm": self.max_grad_norm})
            trainer.state.should_stop = True  # the run checkpoints and ends after this step

    def state_dict(self, trainer):  # kept in checkpoints under payload["callbacks"]["LossTarget"]
        return {"max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, trainer, state):  # on resume (None: the checkpoint has none)
        self.max_grad_norm = state["max_grad_norm"] if state else 0.0

    def on_fit_end(self, trainer, summary):
        summary["max_grad_norm"] = self.max_grad_norm


def main() -> None:
    cfg = load_config(None, ["train.steps=2000", "log.every=50", "log.progress=plain", "log.plots=false"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer.from_config(cfg, out_dir=f"{out}/run", callbacks=[LossTarget(target=0.6)])
        summary = trainer.fit()
    print(f"stopped at step {summary['steps']} of 2000; largest gradient norm {summary['max_grad_norm']:.3f}; "
          f"test accuracy {summary['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()
