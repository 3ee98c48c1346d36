"""The Python API's arguments, checked at the call.

A wrong type raises `ArgumentTypeError` (also a TypeError), a wrong value `ArgumentValueError` (also a
ValueError); both are gradwise's `UserInputError`, with a one-line message naming the argument, the value
received and what is allowed. `gradwise.run(main)` turns one that escapes a script into that line and exit
status 2, as the command line does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from gradwise.config import Config, validate
from gradwise.config.loading import short_repr
from gradwise.errors import ArgumentTypeError, ArgumentValueError

TASKS = ("classification", "language_model")


def _refuse(name: str, value: Any, allowed: str, kind: type = ArgumentTypeError) -> ArgumentTypeError:
    return kind(f"argument error: {name}={short_repr(value)} ({type(value).__name__}); allowed: {allowed}")


def check_type(name: str, value: Any, types: type | tuple[type, ...], allowed: str, optional: bool = True) -> None:
    """`value` is one of `types` (or None when `optional`), else ArgumentTypeError."""
    if not (value is None and optional) and not isinstance(value, types):
        raise _refuse(name, value, allowed + (" or None" if optional else ""))


def check_path(name: str, value: Any, optional: bool = True) -> None:
    """A file or folder path: a non-empty str or os.PathLike without a NUL character (or None when `optional`)."""
    check_type(name, value, (str, os.PathLike), "a path (str or pathlib.Path)", optional)
    if value is not None and (not str(value) or "\x00" in str(value)):
        raise _refuse(name, value, "a non-empty path without NUL characters", ArgumentValueError)


def check_overrides(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple, type(None))) or not all(isinstance(o, str) for o in value or []):
        raise _refuse(name, value, "a list of 'key.sub=value' strings, or None")


def check_callable(name: str, value: Any, allowed: str, optional: bool = True) -> None:
    if not (value is None and optional) and not callable(value):
        raise _refuse(name, value, allowed + (", or None" if optional else ""))


def check_count(name: str, value: Any, minimum: int = 1, optional: bool = True) -> None:
    """An int (not a bool) of at least `minimum`, or None when `optional`."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(name, value, f"an int >= {minimum}" + (" or None" if optional else ""))
    if value < minimum:
        raise _refuse(name, value, f"an int >= {minimum}", ArgumentValueError)


def config_argument(name: str, value: Any) -> Config:
    """A Config as given, a dict of config keys validated into one (ConfigError naming the key), None: defaults."""
    if value is None:
        return Config()
    if isinstance(value, Config):
        return value
    if isinstance(value, Mapping):
        return validate(dict(value))
    raise _refuse(name, value, "a gradwise Config (gradwise.load_config(...)), a dict of config keys, or None")


def a_name(value: Any) -> bool:
    """A non-empty name without spaces or control characters (a metric's, a result prefix): it starts keys."""
    return isinstance(value, str) and bool(value) and not any(c.isspace() or not c.isprintable() for c in value)


def check_data(name: str, value: Any, optional: bool = True) -> None:
    """A Dataset, a DataLoader (or a torch IterableDataset), or a map-style dataset of another library (indexable,
    with a length that works: a Hugging Face `datasets.Dataset`)."""
    if value is None and optional:
        return
    if isinstance(value, (str, bytes, os.PathLike)):
        raise _refuse(name, value, "a Dataset or DataLoader (to train on a file, read it into one, or use "
                                   "Trainer.from_config with data.name=npz/csv data.path=FILE)")
    if isinstance(value, Mapping):
        raise _refuse(name, value, f"one split, a Dataset or DataLoader (pass e.g. {name}=splits['train'])")
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(value, (DataLoader, IterableDataset)):
        return
    if not (hasattr(value, "__getitem__") and hasattr(value, "__len__")):
        hint = " (wrap an iterator or generator in a torch.utils.data.IterableDataset)" \
            if isinstance(value, Iterable) else ""
        raise _refuse(name, value, "a Dataset (map-style: __getitem__ and __len__; or an IterableDataset) or a "
                                   "DataLoader" + (", or None" if optional else "") + hint)
    try:
        len(value)
    except Exception as err:  # noqa: BLE001 - a __len__ of the user's that fails or returns nonsense
        raise _refuse(name, value, f"a dataset whose len() works (it raised {type(err).__name__}: {err})",
                      ArgumentValueError) from None


def check_model(name: str, model: Any) -> None:
    from torch import nn

    if not isinstance(model, nn.Module):
        raise _refuse(name, model, "a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ArgumentValueError(f"argument error: {name}={type(model).__name__} has no parameters that require "
                                 "gradients; there is nothing to train")


def check_callbacks(name: str, value: Any) -> None:
    """A list or tuple (each item a gradwise.Callback: gradwise.train.callbacks.CallbackList checks them)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _refuse(name, value, "a list of gradwise.Callback objects")


def check_metrics(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise _refuse(name, value, "a dict of name -> function(output, target) or metric object, or None")
    for key, metric in value.items():
        if not a_name(key):
            raise _refuse(f"{name} key", key, "a name without spaces (it becomes val_NAME, test_NAME)",
                          ArgumentValueError)
        if not (callable(metric) or all(hasattr(metric, a) for a in ("update", "compute", "reset"))):
            raise _refuse(f"{name}[{key!r}]", metric, "a function(output, target) or an object with update, "
                                                       "compute and reset (a torchmetrics Metric)")


def trainer_arguments(args: dict[str, Any]) -> Config:
    """Check `Trainer.__init__`'s arguments (its `locals()`); returns the config (see `config_argument`)."""
    import torch

    from gradwise.parallel.strategy import GradientSync

    check_model("model", args["model"])
    check_data("train_data", args["train_data"], optional=False)  # val_data, test_data: as_pipeline checks them
    for key, allowed in (("loss_fn", "a function loss_fn(output, target) -> one-element tensor"),
                         ("count_fn", "a function count_fn(target) -> the number of loss-bearing items"),
                         ("collate_fn", "a function collate_fn(list of samples) -> batch")):
        check_callable(key, args[key], allowed)
    for key, kind, what in (("optimizer", torch.optim.Optimizer, "a torch.optim.Optimizer or a function model -> "
                                                                 "optimizer (default: the config's optim.name)"),
                            ("scheduler", torch.optim.lr_scheduler.LRScheduler,
                             "a torch.optim.lr_scheduler.LRScheduler or a function optimizer -> scheduler "
                             "(default: the config's schedule.name)")):
        if args[key] is not None and not isinstance(args[key], kind) and not callable(args[key]):
            raise _refuse(key, args[key], what + ", or None")
    check_path("out_dir", args["out_dir"])
    check_type("task", args["task"], str, f"a name ({', '.join(TASKS)}: accuracy or bits per character reported; "
                                          "another: the loss alone), or None (inferred from the first batch)")
    check_callbacks("callbacks", args["callbacks"])
    check_metrics("metrics", args["metrics"])
    check_type("sync", args["sync"], GradientSync, "a gradwise GradientSync (gradwise.parallel)")
    if args["source"] is not None and not all(hasattr(args["source"], a) for a in ("next_step", "configure")):
        raise _refuse("source", args["source"], "a gradwise StepSource (gradwise.train.source), or None")
    return config_argument("config", args["config"])


def budget_argument(name: str, value: Any) -> int:
    """A memory budget: bytes (an int > 0) or text with a unit ("2GiB", "500MB")."""
    from gradwise.config import parse_bytes

    if not isinstance(value, str):
        check_count(name, value, optional=False)
    try:
        return parse_bytes(str(value), name)
    except ValueError as err:
        raise ArgumentValueError(f"argument error: {err}") from None


def fit_arguments(max_steps: Any, resume: Any) -> None:
    check_count("max_steps", max_steps)
    check_type("resume", resume, bool, "True or False", optional=False)
