"""gradwise: a PyTorch training system whose speed, memory, stability and scale claims are measured.

    from gradwise import Trainer, Callback, Config, load_config, inspect, inspect_precision, plan, run

Bad input to any of them raises a gradwise.errors.UserInputError (an argument's type: also a TypeError; any
other: also a ValueError) with a one-line message; `gradwise.run(main)` makes a script exit 2 with that line.
"""

from gradwise.config import Config, load_config
from gradwise.errors import UserInputError, run
from gradwise.tools.inspect import inspect_model as inspect
from gradwise.tools.precision import inspect_precision_model as inspect_precision
from gradwise.tools.planner import Plan, plan_config, plan_model as plan
from gradwise.train import Callback, Trainer

Trainer.planner = staticmethod(plan_config)  # the trainer is handed the planner (a layer above it), not importing it

__all__ = ["Trainer", "Callback", "Config", "Plan", "UserInputError", "inspect", "inspect_precision", "load_config",
           "plan", "run"]
__version__ = "0.1.0"
