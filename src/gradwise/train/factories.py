"""What a config builds: the built-in data set and model, or yours by import path (docs/your_model.md).

    model.factory=my_pkg.models:build model.args.n_layer=4 data.factory=my_pkg.data:build data.args.context=64

`config_data(cfg)` returns the built-in data set (gradwise.data) or what `data.factory(**data.args)` returned,
as `RunData` (train, val, test, collate_fn); `config_model(cfg, data)` the built-in model or
`model.factory(**model.args)`; `config_loss(cfg)` the function `model.loss` names (None: the default). Every
process builds from the same config, so a resumed run, another rank or node and an async worker rebuild the
same objects from config.yaml. An import path is `package.module:callable` (the current directory is
importable, after installed packages) or `path/to/file.py:callable` (made absolute when the config is read;
its folder importable, as a script's is). A
path that does not import, arguments the callable does not take, or a return of the wrong kind is a one-line
ConfigError naming the key, the path and what was found.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from gradwise.config import Config
from gradwise.data import DataBundle, build_data
from gradwise.errors import ConfigError
from gradwise.nn import build_model

SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}  # a factory's dict keys
_FILES: dict[Path, Any] = {}  # file.py modules loaded, by resolved path: one module object per file


@dataclass
class RunData:
    """The data a config names: its sets (Datasets or DataLoaders), their collate function, the task when known
    (the built-in data sets'), and the built-in DataBundle the built-in models are shaped by."""

    train: Any
    val: Any = None
    test: Any = None
    collate_fn: Callable | None = None
    task: str | None = None
    bundle: DataBundle | None = None


def _import_file(key: str, path: str, file: str) -> Any:
    """The module `file` holds, loaded once per process and importable by its name (its folder joins sys.path,
    as a script's does: its sibling modules import, and a loader worker started by `spawn` finds its classes)."""
    resolved = Path(file).resolve()
    if not resolved.is_file():
        raise ConfigError(f"config error: {key}={path!r}: there is no file {file}")
    if resolved not in _FILES:
        taken = sys.modules.get(resolved.stem)
        name = resolved.stem if taken is None or getattr(taken, "__file__", None) == str(resolved) else \
            f"gradwise_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, resolved)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        if str(resolved.parent) not in sys.path:
            sys.path.append(str(resolved.parent))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        _FILES[resolved] = module
    return _FILES[resolved]


def load_callable(key: str, path: str) -> Callable:
    """The callable `path` names (`package.module:name` or `file.py:name`; `name` may be `Class.attribute`)."""
    where, _, attributes = path.rpartition(":")
    try:
        if where.endswith(".py"):
            module = _import_file(key, path, where)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())  # a package in the current directory (after installed ones)
            module = importlib.import_module(where)
    except (ImportError, SyntaxError) as err:
        raise ConfigError(f"config error: {key}={path!r} does not import: {type(err).__name__}: {err}") from None
    found: Any = module
    for name in attributes.split("."):
        if not hasattr(found, name):
            own = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                   and getattr(v, "__module__", None) == module.__name__]
            raise ConfigError(f"config error: {key}={path!r}: {where} has no {attributes!r} (its own callables: "
                              f"{', '.join(own[:12]) or 'none'})")
        found = getattr(found, name)
    if not callable(found):
        raise ConfigError(f"config error: {key}={path!r} is {a(found)}, not a callable")
    return found


def a(value: Any) -> str:
    """'a dict', 'an int': what `value` is, for messages."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def call_factory(key: str, path: str, args: dict[str, Any]) -> Any:
    """`path`'s callable called with `args` (the `.args` key beside `key`), which it must take."""
    factory = load_callable(key, path)
    try:
        signature = inspect.signature(factory)
    except ValueError:  # no signature to check (a builtin): the call itself will say
        signature = None
    if signature is not None:
        try:
            signature.bind(**args)
        except TypeError as err:
            takes = ", ".join(n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL,
                                                                                           p.VAR_KEYWORD))
            raise ConfigError(f"config error: {key}={path!r} cannot be called with {key.split('.')[0]}.args="
                              f"{args!r}: {err} (it takes: {takes or 'nothing'})") from None
    return factory(**args)


def _is_data(value: Any) -> bool:
    """A Dataset (map-style or streaming), a DataLoader, or a sequence of samples read like one (a list, a Hugging
    Face `datasets.Dataset`); not a tuple (`return train, val` meant a dict), a string or a mapping."""
    if isinstance(value, (Dataset, DataLoader)):
        return True
    if isinstance(value, (tuple, str, bytes, Mapping)):
        return False
    return hasattr(value, "__getitem__") and hasattr(value, "__len__")


def user_data(returned: Any, path: str) -> RunData:
    """What `data.factory` returned, as RunData: one set (training), or a dict (a `datasets.DatasetDict` too) of
    train, val or validation, test and collate_fn."""
    key = f"config error: data.factory={path!r} returned"
    if _is_data(returned):
        return RunData(train=returned)
    if isinstance(returned, tuple):
        raise ConfigError(f"{key} a tuple of {len(returned)}; return a dict naming the sets: {{'train': ..., "
                          "'val': ..., 'test': ..., 'collate_fn': ...}")
    if not isinstance(returned, Mapping):
        raise ConfigError(f"{key} {a(returned)}; allowed: a Dataset, a DataLoader, or a dict of "
                          "train, val (or validation), test and collate_fn")
    unknown = [k for k in returned if k not in SPLITS and k != "collate_fn"]
    if unknown:
        raise ConfigError(f"{key} a dict with the key {unknown[0]!r}; allowed: train, val (or validation), test, "
                          "collate_fn")
    if "val" in returned and "validation" in returned:
        raise ConfigError(f"{key} a dict with both 'val' and 'validation'; return one of them")
    if returned.get("train") is None:
        raise ConfigError(f"{key} a dict without a 'train' set (keys: {', '.join(map(str, returned))})")
    data = RunData(train=None)
    for name, value in returned.items():
        if name == "collate_fn":
            if value is not None and not callable(value):
                raise ConfigError(f"{key} collate_fn={a(value)}, which is not callable")
            data.collate_fn = value
        elif value is not None:
            if not _is_data(value):
                raise ConfigError(f"{key} {name}={a(value)}, which is not a Dataset or a DataLoader")
            setattr(data, SPLITS[name], value)
    return data


def config_data(cfg: Config) -> RunData:
    """The data `cfg` names: `data.factory`'s, else the built-in data set `data.name` (with its validation
    split)."""
    if cfg.data.factory is None:
        bundle = build_data(cfg.data, context=cfg.model.context)
        return RunData(bundle.train, bundle.val, bundle.test, task=bundle.task, bundle=bundle)
    return user_data(call_factory("data.factory", cfg.data.factory, cfg.data.args), cfg.data.factory)


def config_model(cfg: Config, data: RunData) -> nn.Module:
    """The model `cfg` names: `model.factory`'s, else the built-in `model.name` shaped for `data`."""
    if cfg.model.factory is None:
        b = data.bundle
        check_model_fits(cfg.model, b.input_shape, b.num_classes, b.task)
        return build_model(cfg.model, b.input_shape, b.num_classes, b.task)
    model = call_factory("model.factory", cfg.model.factory, cfg.model.args)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"config error: model.factory={cfg.model.factory!r} returned {a(model)}, not a "
                          "torch.nn.Module")
    return model


TRAINING_COPIES = 4  # float32 values a parameter holds while it trains: itself, its gradient, Adam's two moments


def machine_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_model_fits(model_cfg, input_shape: tuple[int, ...], num_classes: int, task: str) -> None:
    """Refuse a built-in model whose training state cannot fit in this machine's memory, from its parameter count
    on the meta device (nothing allocated), before an allocation fails with a traceback or the machine swaps."""
    import torch

    try:
        with torch.device("meta"):
            params: int | None = sum(p.numel() for p in build_model(model_cfg, input_shape, num_classes,
                                                                      task).parameters())
    except RuntimeError:  # a shape whose size overflows int64
        params = None
    memory = machine_memory()
    if params is None or params * 4 * TRAINING_COPIES > memory:
        given = [f"model.{k}={getattr(model_cfg, k)}" for k, field in type(model_cfg).model_fields.items()
                 if getattr(model_cfg, k) != field.get_default(call_default_factory=True)] or ["the defaults"]
        size = "more parameters than int64 counts" if params is None else \
            f"{params:,} parameters, about {params * 4 * TRAINING_COPIES / 2**30:,.1f} GiB to train"
        raise ConfigError(f"config error: {' '.join(given)} makes a model of {size} (weights, gradients, optimizer "
                          f"state), more than this machine's {memory / 2**30:.1f} GiB of memory; make it smaller")


def checked_build(cfg: Config) -> RunData:
    """Build the config's data (and a model of yours, to check it) before any process or actor starts, so that a
    factory that fails, fails once, in one line."""
    data = config_data(cfg)
    if cfg.model.factory is not None:
        config_model(cfg, data)
    return data


def train_samples(data: RunData) -> int | None:
    """The training set's length (a DataLoader's dataset's); None for a stream."""
    train = data.train.dataset if isinstance(data.train, DataLoader) else data.train
    return None if isinstance(train, IterableDataset) else len(train)


def config_loss(cfg: Config) -> Callable | None:
    """The loss function `model.loss` names; None: gradwise's default (gradwise.train.batch)."""
    return load_callable("model.loss", cfg.model.loss) if cfg.model.loss else None


def describe_source(cfg: Config) -> str:
    """'MODEL on DATA' as the config names them (for progress lines)."""
    model = cfg.model.factory or cfg.model.name
    return f"{model} on {cfg.data.factory or cfg.data.name}"
