"""Data sets gradwise trains on, all built locally (nothing is ever downloaded).

`build_data(cfg.data, context=...)` returns a `DataBundle`: train and test
`TensorDataset`s plus what the model and loss need to know (task, classes or
vocabulary, input shape). Each loader is imported only when its data set is asked for.
"""

from gradwise.config import DataConfig
from gradwise.data.bundle import DataBundle, carve_validation

__all__ = ["DataBundle", "build_data"]


def build_data(cfg: DataConfig, context: int = 128) -> DataBundle:
    """Build the data set named by `cfg.name` (and its validation split). `context` is the LM window length."""
    return carve_validation(_load(cfg, context), cfg.val_fraction, cfg.generator_seed + 1)


def _load(cfg: DataConfig, context: int) -> DataBundle:
    if cfg.name == "mnist1d":
        from gradwise.data.mnist1d import load_mnist1d

        return load_mnist1d(cfg)
    if cfg.name == "digits":
        from gradwise.data.digits import load_digits

        return load_digits(cfg)
    if cfg.name == "text":
        from gradwise.data.text import load_text

        return load_text(cfg, context)
    from gradwise.data.files import load_file

    return load_file(cfg)
