"""A rerun into the same folder reuses what an earlier invocation finished with the same settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def previous_results(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The results.json at `path` if it was written with exactly `settings` (as JSON records them), else None."""
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    return old if old.get("settings") == json.loads(json.dumps(settings)) else None
