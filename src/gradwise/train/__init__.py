"""Training: the Trainer facade, the step engine, callbacks, checkpoint state, metrics and plots."""

from gradwise.train.callbacks import Callback
from gradwise.train.randomness import seed_everything
from gradwise.train.step import StepEngine, default_loss
from gradwise.train.trainer import Trainer

__all__ = ["Callback", "StepEngine", "Trainer", "default_loss", "seed_everything"]
