"""Sharded checkpoints: each process writes its own shards with torch.distributed.checkpoint (DCP).

Under FSDP `checkpoints/last.pt` holds everything but the model and optimizer (step, data position, RNG,
schedule, config, callbacks' state) and names a DCP folder beside it, `shards-<step>-<tag>/`, with the
SHA-256 of each of its files:

    save   every rank writes its shards into a new folder (dcp.save); then rank 0 replaces last.pt
           (atomically), which is the moment the new checkpoint counts; then older folders are removed.
           A crash before that leaves the previous last.pt and the folder it names untouched.
    load   under FSDP each rank reads only what its new shards need, whatever the process count that
           wrote them (DCP reshards); any other strategy reads the folder whole into torch's formats
           (`full_states`). Either way the files are checked against their checksums first.

Model-shaped states a callback checkpoints (`payload["model_states"]`, e.g. early stopping's best weights)
are sharded like the model and travel with it. Optimizer state is keyed by parameter name in DCP folders
(the state-dict API's format) and by index in torch's own `optimizer.state_dict()` format; `by_index` and
`by_name` convert between the two.
"""

from __future__ import annotations

import collections
import hashlib
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.checkpoint.format import load_checkpoint
from gradwise.errors import CheckpointError
from gradwise.io import fsync_dir, write_with

PREFIX = "shards-"


def new_folder_name(step: int) -> str:
    return f"{PREFIX}{step:08d}-{secrets.token_hex(4)}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _my_files(names: list[str], sync) -> list[str]:
    """This rank's share of the files to hash: every N-th, so the ranks read the folder once between them
    (`sync=None`: one process, all of them)."""
    return sorted(names)[sync.rank::sync.world_size] if sync is not None else sorted(names)


def _from_every_rank(obj: Any, sync) -> list[Any]:
    return (sync.rank_states(obj) if sync is not None else None) or [obj]


def write_shards(folder: Path, state: dict[str, Any], sync) -> dict[str, str]:
    """Every rank writes its shards of `state` into `folder` (a collective); returns {file: sha256} of
    the whole folder (on every rank)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), thread_count=1))  # files fsynced
    fsync_dir(folder)  # ... and their names (this rank's file; rank 0: .metadata), and the folder's own
    if sync is None or sync.is_main:
        fsync_dir(folder.parent)
    names = [p.name for p in folder.iterdir() if p.is_file()]
    mine = {name: file_sha256(folder / name) for name in _my_files(names, sync)}
    merged: dict[str, str] = {}
    for part in _from_every_rank(mine, sync):
        merged.update(part)
    return dict(sorted(merged.items()))


def check_shards(folder: Path, files: dict[str, str], sync=None) -> None:
    """Raise CheckpointError on every rank if a file of `folder` is missing or differs from its checksum."""
    problem = None
    for name in _my_files(list(files), sync):
        path = folder / name
        if not path.is_file():
            problem = f"checkpoint error: '{path}' is missing (the sharded checkpoint is incomplete)"
        elif file_sha256(path) != files[name]:
            problem = f"checkpoint error: '{path}' is corrupt (its content does not match the checksum in last.pt)"
        if problem:
            break
    problems = [p for p in _from_every_rank(problem, sync) if p]
    if problems:
        raise CheckpointError(problems[0])


def remove_other_folders(checkpoints: Path, keep: str) -> None:
    """Delete the shard folders last.pt no longer names (older checkpoints, saves a crash cut short)."""
    for folder in checkpoints.glob(f"{PREFIX}*"):
        if folder.is_dir() and folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


def shard_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The model's parameter and buffer shapes as the folder's metadata records them (nothing is read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {key[len("model."):]: tuple(meta.size) for key, meta in _metadata(folder).state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


def _metadata(folder: Path):
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # noqa: BLE001 - a damaged metadata file can fail the unpickler in any way
        raise CheckpointError(f"checkpoint error: '{folder}' is unreadable or corrupt ({type(err).__name__})") from None


def read_whole(folder: Path) -> dict[str, Any]:
    """The folder's whole content, unsharded, as {"model": ..., "optimizer": ...} in the state-dict API's
    formats (read in this process alone, whether or not a process group exists)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:  # as torch's own dcp_to_torch_save reads a folder whole (dcp.load fills a copy of an empty dict)
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(folder)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except Exception as err:  # noqa: BLE001 - as torch.load, damaged bytes fail in many ways
        raise CheckpointError(f"checkpoint error: '{folder}' is unreadable or corrupt ({type(err).__name__})") from None
    return state


def full_states(payload: dict[str, Any]) -> tuple[dict, dict, dict]:
    """A checkpoint's model state, optimizer state (torch's own formats) and model-shaped states (`model_states`:
    {name: a state dict shaped like the model's}, e.g. early stopping's best weights), read whole from its
    shard folder if it has one."""
    if "shards" not in payload:
        return payload["model"], payload["optimizer"], payload.get("model_states", {})
    whole = read_whole(Path(payload["shards"]["path"]))
    return whole["model"], by_index(whole["optimizer"]), whole.get("model_states", {})


def model_shapes(payload: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The checkpoint's model shapes, {name: shape}, without reading a shard folder's tensors."""
    if "shards" in payload:
        return shard_shapes(Path(payload["shards"]["path"]))
    return {name: tuple(value.shape) for name, value in payload["model"].items()}


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 model_states: list[str]) -> dict[str, dict]:
    """Each rank reads the parts of `folder` its own shards need (any process count wrote it) into `model`
    and `optimizer` (a collective); returns the named model-shaped states, sharded like the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # the shapes to fill, sharded as now
    # get_state_dict gives every parameter optimizer state (a zero step); keep the entries the checkpoint has,
    # so a parameter that had none (it never got a gradient) has none after the load either
    saved = set(_metadata(folder).state_dict_metadata)
    kept = {name: {k: v for k, v in entry.items() if f"optimizer.state.{name}.{k}" in saved}
            for name, entry in optimizer_state.get("state", {}).items()}
    optimizer_state["state"] = {name: entry for name, entry in kept.items() if entry}
    state = {"model": model_state, "optimizer": optimizer_state}
    if model_states:
        state["model_states"] = {name: {k: torch.empty_like(v) for k, v in model.state_dict().items()}
                                 for name in model_states}
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))
    except Exception as err:  # noqa: BLE001 - DCP reports a mismatch with the checkpoint as any of several types
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint error: '{folder}' does not fit this model and optimizer "
                              f"({reason})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))  # parameters without state; model keys: checked before
    return state.get("model_states", {})


def by_index(state: dict) -> dict:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) keyed by index instead
    (`optimizer.state_dict()`'s: parameters numbered in param-group order)."""
    if "param_groups" not in state:  # ranks other than 0 get nothing from a full-state gather
        return state
    index, groups = {}, []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state.get("state", {}).items()}, "param_groups": groups}


def by_name(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of `by_index`, numbering this optimizer's parameters in its param-group order."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


EXPORT_MARK = {"gradwise": {"export": 1}}  # in an export's `_metadata` (what load_state_dict reads, ignores here)


def exported_before(path: Path) -> bool:
    """Whether `path` is a file `export_model` wrote (its state dict carries EXPORT_MARK)."""
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - whatever the file is, it is not an export
        return False
    return isinstance(old, dict) and (getattr(old, "_metadata", None) or {}).get("gradwise") == EXPORT_MARK["gradwise"]


def export_model(run_dir: Path, out: Path) -> int:
    """Write the model state_dict of `run_dir`'s last checkpoint, whole (a sharded one consolidated), to
    `out`, a file `torch.load(out, weights_only=True)` reads and `model.load_state_dict` takes; returns the
    number of tensors."""
    for _ in range(3):  # a run training meanwhile may replace last.pt and remove the folder it named
        payload = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        if "shards" not in payload or Path(payload["shards"]["path"]).is_dir():
            break
    if "shards" in payload:
        check_shards(Path(payload["shards"]["path"]), payload["shards"]["files"])
    model_state = collections.OrderedDict(full_states(payload)[0])
    model_state._metadata = collections.OrderedDict(EXPORT_MARK)  # type: ignore[attr-defined]
    write_with(out, lambda handle: torch.save(model_state, handle))
    return len(model_state)
