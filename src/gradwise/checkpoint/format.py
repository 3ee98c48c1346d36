"""Checkpoint contents and I/O: model, optimizer, scheduler, data position, RNG states, config.

`last.pt` loads with `torch.load(path, weights_only=True)`; every value is a
tensor or a plain Python container of numbers and strings, and `sha256` is the
checksum of all the rest (`content_sha256`), checked on every load. The gradient-sync strategy
writes them (atomically; gradwise.parallel.strategy); a sharded one keeps the model and optimizer in
a folder that last.pt names (`shards`, gradwise.checkpoint.sharded). The RNG streams are
gradwise.train.randomness.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.errors import CheckpointError
from gradwise.optim.layerwise import is_sharded

FORMAT = "gradwise-checkpoint"
VERSION = 3  # 2: a content checksum (`sha256`); 3: callbacks' and sources' state in "callbacks", "launch",
READS = (2, VERSION)  # every process's RNG state in "rng" (version 2 files are read through `upgraded_payload`)
LEGACY_STATE = {"evaluation": "Evaluator", "early_stopping": "EarlyStop", "stream": "StreamSteps",
                "delay": "DelayedGradients", "ps": "PushedGradients"}  # version 2's keys -> version 3's
BEST_WEIGHTS = "early_stopping.best_weights"  # early stopping's best weights among the model-shaped states


def content_sha256(payload: Any) -> str:
    """SHA-256 over a checkpoint's content: every key and value in order, each tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            digest.update(f"D{len(obj)}|".encode())
            for key, value in obj.items():
                feed(key)
                feed(value)
        elif isinstance(obj, (list, tuple)):
            digest.update(f"L{len(obj)}|".encode())
            for value in obj:
                feed(value)
        elif isinstance(obj, (set, frozenset)):  # no order to trust: the elements' own digests, sorted
            digest.update(f"S{len(obj)}|{''.join(sorted(content_sha256(v) for v in obj))}".encode())
        else:
            digest.update(f"{type(obj).__name__}:{obj!r}|".encode())

    feed(payload)
    return digest.hexdigest()


def with_header(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` marked as a gradwise checkpoint of this format version, with the checksum of its content."""
    marked = {"format": FORMAT, "version": VERSION, **payload}
    return {**marked, "sha256": content_sha256(marked)}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a checkpoint, raising CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint error: no checkpoint at '{path}'")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged bytes can fail the unpickler in any way (KeyError, ...)
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint error: '{path}' is unreadable or corrupt ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint error: '{path}' is not a gradwise checkpoint")
    if payload.get("version") not in READS:
        raise CheckpointError(f"checkpoint error: '{path}' has format version {payload.get('version')}; this "
                              f"gradwise reads {', '.join(map(str, READS))}")
    stored = payload.pop("sha256", None)
    if stored != content_sha256(payload):
        raise CheckpointError(f"checkpoint error: '{path}' is corrupt (its content does not match the checksum "
                              "written with it); resume from another copy or start the run again")
    states = ("shards",) if "shards" in payload else ("model", "optimizer")  # shards: a sharded checkpoint's folder
    missing = [k for k in (*states, "scheduler", "step", "position", "rng", "config") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint error: '{path}' lacks {missing}")
    if "shards" in payload:
        payload["shards"]["path"] = str(path.parent / payload["shards"]["dir"])
    legacy = (payload.get("early_stopping") or {}).pop("best_weights", None)  # where files before model_states
    if legacy is not None:                                                    # kept them
        payload.setdefault("model_states", {})[BEST_WEIGHTS] = legacy
    return upgraded_payload(payload) if payload["version"] == 2 else payload


def upgraded_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A version 2 payload (each callback's state under a key of its own) in version 3's layout."""
    callbacks = {name: payload.pop(key) for key, name in LEGACY_STATE.items() if key in payload}
    if "metrics_records" in payload:
        callbacks["MetricsFile"] = {"records": payload.pop("metrics_records")}
    progress = payload.get("progress", {})
    if "window_loss" in progress:
        callbacks["TrainMetrics"] = {"loss": progress.pop("window_loss"), "steps": progress.pop("window_steps", 0)}
    launched = (("DelayedGradients", "simulate"), ("PushedGradients", "async"))
    strategy, workers = next(((strategy, callbacks[name]["workers"]) for name, strategy in launched
                              if name in callbacks), (None, None))
    payload["launch"] = {"strategy": strategy, "workers": workers}
    payload["rng"] = payload.pop("rng_ranks", None) or [payload["rng"]]
    payload["callbacks"] = callbacks
    return {**payload, "version": VERSION}


def check_model_state(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointError if a checkpoint's model `shapes` ({name: shape}) do not fit `model` key for key
    and shape for shape."""
    own = {name: tuple(value.shape) for name, value in model.state_dict().items()}  # a DTensor's shape is whole
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint error: '{where}' does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, shape in own.items():
        if tuple(shapes[k]) != shape:
            raise CheckpointError(
                f"checkpoint error: '{where}' does not match the model: {k} has shape "
                f"{tuple(shapes[k])} in the checkpoint, {shape} in the model"
            )


def params_sha256(model: nn.Module) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every parameter in `named_parameters()` order (a sharded
    parameter is gathered whole first: a collective, every rank calls this)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        # a copy: numpy would pin the parameter's storage, which FSDP frees and refills between passes
        t = (p.full_tensor() if is_sharded(p) else p).detach().to("cpu").clone()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
