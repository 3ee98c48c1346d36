"""Loading a config: YAML 1.2 files, `key.sub=value` overrides, validation with one-line errors.

`load_config` is the single entry point used by the CLI and by tests:

    cfg = load_config("run.yaml", ["optim.lr=0.01", "train.steps=200"])
"""

from __future__ import annotations

import copy
import os
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gradwise.config.schema import Config
from gradwise.errors import ArgumentTypeError, ConfigError
from gradwise.io import read_text


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and numbers: only true/false are booleans (`off`, `no`, `on`
    stay strings), `1e-3` is a float, and `2:3.0` stays a string (YAML 1.1 read it as base 60)."""


_REPLACED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"),
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


MAX_YAML_VALUES = 100_000  # values a document may hold once its aliases are expanded (a config holds hundreds)
MAX_YAML_DEPTH = 100  # levels of nesting (a config has three or four; deeper would exhaust Python's recursion)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a document whose aliases expand past MAX_YAML_VALUES values (a "billion laughs") or refer to
    themselves, or that nests deeper than MAX_YAML_DEPTH, before anything builds or prints the expanded value."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if closing:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            depths[id(node)] = 1 + max((depths[id(child)] for child in _children(node)), default=0)
            if depths[id(node)] > MAX_YAML_DEPTH:
                raise ConfigError(f"config error: {where} nests deeper than {MAX_YAML_DEPTH} levels; a config has "
                                  "three or four")
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise ConfigError(f"config error: {where} expands (through its aliases) to more than "
                                  f"{MAX_YAML_VALUES} values; a config holds far fewer")
        elif id(node) not in sizes:
            if id(node) in open_nodes:
                raise ConfigError(f"config error: {where} has an alias that refers to itself")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def yaml_load(text: str, where: str = "the YAML") -> Any:
    """`text` read as YAML 1.2 (see _YamlLoader). A document nested past Python's limit, whose aliases expand
    past MAX_YAML_VALUES or that holds a value YAML cannot build (an integer of thousands of digits) raises
    ConfigError naming `where`; a syntax error raises yaml.YAMLError."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"config error: {where} is nested too deeply to read") from None
    except ValueError as err:  # e.g. an integer past Python's 4300-digit conversion limit
        reason = "a number too long to read" if "digits" in str(err) else f"a value YAML cannot build ({err})"
        raise ConfigError(f"config error: {where} holds {reason}".replace("\n", " ")) from None
    finally:
        loader.dispose()


class _ShortRepr(reprlib.Repr):
    """Reprs of bounded length, whatever the value (an expanded alias, an integer of thousands of digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 60, 60, 40

    def repr_int(self, x: int, level: int) -> str:
        return super().repr_int(x, level) if x.bit_length() < 128 else f"<an integer of {x.bit_length()} bits>"


short_repr = _ShortRepr().repr


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys allowed at `path` inside `model` (for error messages)."""
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(Config, loc[:-1]))
            parts.append(f"unknown key '{key}' (allowed: {allowed})")
        elif e["type"] == "value_error":  # our validators name their keys themselves
            parts.append(e["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"{key}={short_repr(e.get('input'))}: {e['msg']}")
    return "config error: " + "; ".join(parts)


def validate(raw: dict[str, Any]) -> Config:
    """Validate a nested dict into a Config, raising ConfigError with a one-line message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: the config must be a mapping of keys, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (['a', 'b'], value); the value is read as YAML (so 3, 0.1, true, [1,2] work)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"config error: override '{text}' must look like key.sub=value")
    try:
        parsed = yaml_load(value, f"the value of '{key}'") if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key.sub=value` override set."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(path[: i + 1])
                raise ConfigError(f"config error: '{prefix}' is a value, not a section, so '{text}' cannot set "
                                  "under it")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (empty file -> {})."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config error: cannot read config file '{path}': it is a folder")
    text = read_text(path, ConfigError)
    try:
        raw = yaml_load(text, f"'{path}'")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config error: '{path}' is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: '{path}' must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the overrides, validated once."""
    if path is not None and (not isinstance(path, (str, os.PathLike)) or not str(path) or "\x00" in str(path)):
        raise ArgumentTypeError(f"argument error: path={short_repr(path)}; allowed: a YAML file's path (str or "
                                "pathlib.Path, no NUL characters) or None")
    if not isinstance(overrides, (list, tuple, type(None))) or not all(isinstance(o, str) for o in overrides or []):
        raise ArgumentTypeError(f"argument error: overrides={short_repr(overrides)}; allowed: a list of "
                                "'key.sub=value' strings or None")
    raw = read_yaml(path) if path is not None else {}
    return validate(apply_overrides(raw, overrides or []))
