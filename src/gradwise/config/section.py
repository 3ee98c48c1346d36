"""The base of every config section: unknown keys are errors, assignments are validated, a resolved config is frozen."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # no inf/nan anywhere
    _frozen: bool = PrivateAttr(default=False)  # set by Config.frozen(): a resolved config is read-only

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
