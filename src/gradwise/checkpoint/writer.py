"""Writing a checkpoint, the piece a sync strategy is handed: one file, or each process's shards and one file
naming them.

Both write `last.pt` atomically (temp file, fsync, rename) with the header and content checksum of
gradwise.checkpoint.format, from the main process; last.pt is the moment a checkpoint counts. `group` is the
strategy (its `is_main`, `broadcast`, and the collectives gradwise.checkpoint.sharded needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gradwise.checkpoint.format import with_header
from gradwise.checkpoint.sharded import new_folder_name, remove_other_folders, write_shards
from gradwise.io import write_with


class OneFile:
    """The whole payload in last.pt (one process, DDP: the model and optimizer in torch's own formats)."""

    def save(self, path: Path, payload: dict[str, Any], group: Any) -> None:
        """Write `payload` (every process calls this; the main one writes)."""
        if group.is_main:
            marked = with_header(payload)
            write_with(path, lambda handle: torch.save(marked, handle))
            if "shards" not in payload:  # a sharded run resumed here: its folders are no longer named
                remove_other_folders(path.parent, keep="")


class Shards(OneFile):
    """Each process writes its shards of the model, the optimizer and the model-shaped states to a new folder
    beside last.pt (torch.distributed.checkpoint); then last.pt names it and older folders are removed."""

    def save(self, path: Path, payload: dict[str, Any], group: Any) -> None:
        name = group.broadcast(new_folder_name(payload["step"]))
        state = {"model": payload.pop("model"), "optimizer": payload.pop("optimizer"),
                 "model_states": payload.pop("model_states", {})}
        files = write_shards(path.parent / name, state, group)
        super().save(path, {**payload, "shards": {"dir": name, "files": files, "world_size": group.world_size,
                                                  "model_states": sorted(state["model_states"])}}, group)
        if group.is_main:
            remove_other_folders(path.parent, keep=name)
