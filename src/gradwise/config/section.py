"""The base of every config section: unknown keys are errors, assignments are validated, a resolved config is frozen."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

LARGEST_INT = 2**63 - 1  # what torch and numpy hold in an int64: a count or size beyond it cannot work


def _unwritable(value: Any) -> str | None:
    """What in `value` config.yaml could not record as it is (bytes, a date, a NUL character), else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "a NUL character"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif not (item is None or isinstance(item, (bool, int, float))):
            return f"a {type(item).__name__}"
    return None


def _types(annotation: Any) -> set:
    """The plain types an annotation admits (Optional[int] -> {int, NoneType}; list[int] -> {list})."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_types(a) for a in args))
    if typing.get_origin(annotation) is typing.Literal:
        return {type(a) for a in args}
    return {typing.get_origin(annotation) or annotation}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # no inf/nan anywhere
    _frozen: bool = PrivateAttr(default=False)  # set by Config.frozen(): a resolved config is read-only

    @field_validator("*", mode="before")
    @classmethod
    def _plain_value(cls, value: Any, info) -> Any:
        """No boolean where a number is meant (`train.steps=true` is not 1 step) and no integer past int64,
        in any key, before pydantic's own conversions see them."""
        admits = _types(cls.model_fields[info.field_name].annotation)
        if any(isinstance(t, type) and issubclass(t, BaseModel) for t in admits):
            return value  # a section: its own keys are checked there, under their names
        if isinstance(value, bool) and bool not in admits and Any not in admits:
            raise PydanticCustomError("not_bool", "a boolean where a number or a name is expected")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INT:
            raise PydanticCustomError("too_large", f"an integer beyond {LARGEST_INT} (the int64 range)")
        odd = _unwritable(value)
        if odd is not None:
            raise PydanticCustomError("not_plain", f"holds {odd}; config values are text, numbers, booleans, null "
                                                   "and lists or mappings of them (what config.yaml can record)")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "_frozen" and (getattr(self, "__pydantic_private__", None) or {}).get("_frozen"):
            raise TypeError(f"this config is resolved and frozen (setting {type(self).__name__}.{name}); "
                            "edit a copy from .thawed() before building the run")
        super().__setattr__(name, value)

    def given(self, key: str) -> bool:
        """Whether `key` was set explicitly: given in the YAML or an override, or fixed by resolving the config
        (every key of a frozen config is)."""
        return key in self.model_fields_set or bool(self._frozen)

    def _set_frozen(self, frozen: bool) -> None:
        self._frozen = frozen
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Section):
                value._set_frozen(frozen)
