"""A rerun into the same folder reuses what an earlier invocation finished with the same settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def previous_results(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The results.json at `path` if it was written with exactly `settings` (as JSON records them), else None."""
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    return old if old.get("settings") == json.loads(json.dumps(settings)) else None


def runs_dir(out: Path, record: dict[str, Any]) -> Path:
    """Where an experiment keeps its finished runs: a folder per settings record (a hash of it), so a rerun into
    the same folder reuses exactly the runs finished with the same settings."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    return out / f"runs-{digest}"
