"""The run's random streams: every draw a run makes comes from `seed`, never from what ran before.

    training     dropout and any other draw inside the step: seeded at the run's first step from `seed`
                 and the rank, checkpointed, restored on resume and at each next `fit`
    evaluation   restarted from a seed of its own at every evaluation and put back afterwards, so
                 evaluating (how often, or an extra `trainer.evaluate()`) never moves the training stream
    batches      each batch is read and collated (a random collator, augmentation in `__getitem__`) under a
                 seed of its own, derived from `seed`, the stream (training or evaluation), the rank and the
                 batch's key (map-style: its epoch and index, or its first row; a stream: its epoch, the
                 loader worker and the worker's count of batches), in the training process or in a loader
                 worker alike: the same batches whatever the number of workers (map-style data), and a
                 resume needs no state to continue them

`derived_seed(seed, *keys)` makes the seeds (numpy's SeedSequence: independent streams). Model initialisation
is the user's (a built-in model is seeded with `seed` itself by `Trainer.from_config`).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch

TRAIN, EVAL, TRAIN_DATA, EVAL_DATA = 1, 2, 3, 4  # the streams' keys


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream `keys` of run seed `seed` (numpy's SeedSequence: independent streams)."""
    entropy = [seed % 2**64, *(k % 2**64 for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (every device's) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def continue_training_stream(saved: dict[str, Any] | None, seed: int, rank: int) -> None:
    """Put the training stream where `saved` left it (the last fit, a checkpoint), or, at the run's first step
    (`saved` None), start it from the seed and the rank."""
    if saved is None:
        seed_everything(derived_seed(seed, TRAIN, rank))
    else:
        restore_rng(saved)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run the block on generators seeded with `seed`; afterwards they are exactly as they were before."""
    saved = capture_rng()
    seed_everything(seed)
    try:
        yield
    finally:
        restore_rng(saved)


@contextlib.contextmanager
def batch_rng(seed: int) -> Iterator[None]:
    """`isolated_rng` for reading one batch, on the CPU generators only (a batch is read on the CPU; ~0.1 ms)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
