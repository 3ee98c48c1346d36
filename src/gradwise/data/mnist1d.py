"""MNIST-1D (Greydanus 2020) generated locally with the `mnist1d` package, cached on disk.

The standard split is 5000 samples, 80% train, generator seed 42 (4000/1000).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import random
from pathlib import Path

import numpy as np

from gradwise.config import DataConfig
from gradwise.data.bundle import DataBundle, classification_bundle
from gradwise.io import write_with


def cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("GRADWISE_CACHE", Path.home() / ".cache" / "gradwise"))


def generate(num_samples: int, train_split: float, seed: int) -> dict[str, np.ndarray]:
    """Run mnist1d's generator, leaving the global python/numpy RNG states as they were."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # mnist1d imports pyplot
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def load_mnist1d(cfg: DataConfig) -> DataBundle:
    key = f"{cfg.num_samples}-{cfg.train_split}-{cfg.generator_seed}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_dir(cfg) / f"mnist1d-{digest}.npz"
    arrays = None
    if path.exists():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            arrays = None  # a damaged cache is regenerated
    if arrays is None:
        arrays = generate(cfg.num_samples, cfg.train_split, cfg.generator_seed)
        write_with(path, lambda handle: np.savez(handle, **arrays))
    return classification_bundle(
        arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"],
        info={"source": "mnist1d", "cache": str(path)},
    )
