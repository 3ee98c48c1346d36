"""Data sets gradwise trains on, all built locally (nothing is ever downloaded).

`build_data(cfg.data, context=...)` returns a `DataBundle`: train and test
`TensorDataset`s plus what the model and loss need to know (task, classes or
vocabulary, input shape).
"""

from gradwise.data.bundle import DataBundle, build_data

__all__ = ["DataBundle", "build_data"]
