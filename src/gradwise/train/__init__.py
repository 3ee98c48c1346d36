"""The trainer: loop, checkpoint state, metrics and plots."""

from gradwise.train.trainer import Trainer, default_loss, seed_everything

__all__ = ["Trainer", "default_loss", "seed_everything"]
