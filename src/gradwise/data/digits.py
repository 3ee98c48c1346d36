"""scikit-learn's bundled 8x8 digits (1797 images), flattened to 64 features in [0, 1]."""

from __future__ import annotations

from gradwise.config import DataConfig
from gradwise.data.bundle import DataBundle, classification_bundle, split_indices


def load_digits(cfg: DataConfig) -> DataBundle:
    from sklearn.datasets import load_digits as sk_load_digits

    x, y = sk_load_digits(return_X_y=True)
    x = x / 16.0
    train, test = split_indices(len(y), cfg.test_fraction, cfg.generator_seed)
    return classification_bundle(
        x[train.numpy()], y[train.numpy()], x[test.numpy()], y[test.numpy()], info={"source": "sklearn digits"}
    )
