"""gradwise: a PyTorch training system whose speed, memory, stability and scale claims are measured.

    from gradwise import Trainer, Callback, Config, load_config
"""

from gradwise.config import Config, load_config
from gradwise.tools.planner import plan_config
from gradwise.train import Callback, Trainer

Trainer.planner = staticmethod(plan_config)  # the trainer is handed the planner (a layer above it), not importing it

__all__ = ["Trainer", "Callback", "Config", "load_config"]
__version__ = "0.1.0"
