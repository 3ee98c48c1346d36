"""Batches of any structure: the one module that knows what a batch looks like.

A batch is whatever the data yields, collated: tensors nested in tuples, lists,
dicts, dataclasses or mapping objects (a Hugging Face `BatchEncoding`). This
module moves one to the device, cuts it into micro-batches along the first
dimension (any nesting), counts its loss-bearing items, calls the model with
it and finds its loss. The top level must be a pair or a mapping; the calling convention:

    (inputs, target)        model(inputs); inputs a tuple/list -> model(*inputs); a mapping -> model(**inputs)
    a mapping               model(**batch)                     (its "labels" are the target)
    the loss                output.loss or output["loss"] when the model computed one (Hugging Face);
                            else loss_fn(output, target) for (inputs, target), loss_fn(output, batch) for a mapping
    loss-bearing items      the target's (or "labels"') first tensor: integer entries other than -100,
                            or every element of a float target; a batch with no target counts its rows;
                            a Hugging Face causal LM (labels shifted inside) counts positions 1..
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate

from gradwise.memory.accumulation import IGNORE_INDEX, item_count

ACCEPTED = ("(inputs, target) pairs (inputs a tensor, a tuple or a mapping of tensors) or a mapping of tensors "
            "(model(**batch))")


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """`obj` with every tensor inside it replaced by `fn(tensor)`, its structure (and types) kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if type(obj) in (tuple, list):  # the common case first: isinstance against Mapping is an ABC check
        return type(obj)(map_tensors(fn, v) for v in obj)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(fn, v) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except TypeError:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(fn, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside `obj`, in order."""
    found: list[torch.Tensor] = []
    map_tensors(lambda t: found.append(t) or t, obj)
    return found


def rows(batch: Any) -> int:
    """The batch size: the first tensor's first dimension."""
    first = next((t for t in tensors(batch) if t.ndim), None)
    return int(first.shape[0]) if first is not None else 0


def to_device(batch: Any, device: torch.device) -> Any:
    return map_tensors(lambda t: t if t.device == device else t.to(device, non_blocking=True), batch)


def split(batch: Any, part: slice, n: int) -> Any:
    """Rows `part` of an n-row batch: every tensor whose first dimension is n is sliced, others are kept."""
    return map_tensors(lambda t: t[part] if t.ndim and t.shape[0] == n else t, batch)


def fetch_batch(dataset: Dataset, idx: torch.Tensor, collate_fn: Callable | None = None) -> Any:
    """Gather samples `idx` and collate them with `collate_fn` (default: torch's `default_collate`; for a
    TensorDataset without one, one indexing op per tensor)."""
    if collate_fn is None and isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    return (collate_fn or default_collate)([dataset[i] for i in idx.tolist()])


def dataset_size(dataset: Dataset) -> int | None:
    """len(dataset), or None for a streaming (iterable) dataset."""
    return None if isinstance(dataset, IterableDataset) else len(dataset)


def first_rows(dataset: Dataset, n: int, collate_fn: Callable | None = None) -> Any:
    """The first `n` samples as one batch (a streaming dataset is iterated from its start)."""
    if isinstance(dataset, IterableDataset):
        return (collate_fn or default_collate)(list(itertools.islice(iter(dataset), n)))
    return fetch_batch(dataset, torch.arange(min(n, len(dataset))), collate_fn)


def is_pair(batch: Any) -> bool:
    if type(batch) in (tuple, list):
        return len(batch) == 2
    return isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields") and len(batch) == 2


def target(batch: Any) -> Any:
    """What the loss compares against: the second element of a pair, or a mapping's "labels"."""
    if is_pair(batch):
        return batch[1]
    if isinstance(batch, Mapping):
        return batch.get("labels")
    return None


def shifted_label_count(labels: torch.Tensor) -> torch.Tensor:
    """Loss-bearing tokens of a causal LM that shifts its labels inside (Hugging Face): positions 1.. not -100."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def default_count_fn(model: Any) -> Callable:
    """`shifted_label_count` for a Hugging Face causal LM (`...ForCausalLM`, `...LMHeadModel`, also inside a
    `torch.compile` or DDP wrapper), else `item_count`. Pass `count_fn=` to decide yourself."""
    inner = getattr(model, "_orig_mod", getattr(model, "module", model))
    return shifted_label_count if type(inner).__name__.endswith(("ForCausalLM", "LMHeadModel")) else item_count


def count_items(batch: Any, count_fn: Callable | None = None) -> torch.Tensor:
    """The batch's loss-bearing items (see the module docstring).

    A `count_fn` of your own receives what `loss_fn` receives: a pair's target, or a mapping batch whole
    (e.g. `lambda target: target[1].sum()` for `(inputs, (y, weights))` with a weight-normalised loss).
    """
    if count_fn is not None and count_fn not in (item_count, shifted_label_count):
        count = count_fn(batch if isinstance(batch, Mapping) else target(batch))
        if isinstance(count, bool) or not isinstance(count, (int, float, torch.Tensor)) or \
                isinstance(count, torch.Tensor) and count.numel() != 1:
            raise TypeError(f"count_fn returned {describe(count)}; it must return a number or a one-element tensor")
        return torch.as_tensor(count)
    found = tensors(target(batch))
    if found:
        return (count_fn or item_count)(found[0])
    first = next(iter(tensors(batch)), None)
    return torch.tensor(rows(batch), device=first.device if first is not None else None)


def call_model(model: Callable, batch: Any) -> Any:
    """The model's output for `batch`, by the calling convention."""
    if is_pair(batch):
        inputs = batch[0]
        if isinstance(inputs, torch.Tensor):
            return model(inputs)
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)) and not hasattr(inputs, "_fields"):
            return model(*inputs)
        return model(inputs)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"a batch of {describe(batch)} is not one gradwise can call a model with; accepted: {ACCEPTED}")


def model_loss(output: Any) -> torch.Tensor | None:
    """The loss the model computed itself (`output.loss` or `output["loss"]`), if any."""
    if isinstance(output, torch.Tensor):
        return None
    if isinstance(output, Mapping):
        loss = output.get("loss")
    else:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def logits(output: Any) -> Any:
    """The prediction tensor of an output: itself, `output.logits` or `output["logits"]`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("logits")
    return getattr(output, "logits", None)


def batch_loss(output: Any, batch: Any, loss_fn: Callable) -> torch.Tensor:
    """The mean loss of `batch`: the model's own, else `loss_fn` (see the module docstring)."""
    own = model_loss(output)
    if own is not None:
        return own
    if is_pair(batch):
        return loss_fn(output, batch[1])
    return loss_fn(output, batch if isinstance(batch, Mapping) else target(batch))


def describe(obj: Any, depth: int = 0) -> str:
    """A short description of a batch's structure for error messages: `dict(x: float32[8, 3], y: int64[8])`."""
    if isinstance(obj, torch.Tensor):
        return f"{str(obj.dtype).removeprefix('torch.')}{list(obj.shape)}"
    if depth > 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        return f"{type(obj).__name__}({', '.join(f'{k}: {describe(v, depth + 1)}' for k, v in list(obj.items())[:6])})"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}({', '.join(describe(v, depth + 1) for v in obj[:6])})"
    return type(obj).__name__
