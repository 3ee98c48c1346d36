"""User data files: `.npz` with arrays `x`, `y` (optionally `x_test`, `y_test`) and numeric `.csv`.

A CSV has one sample per row, an optional header row (a name in every column: a
first row mixing names and numbers is data, and refused as such), and the integer label in
column `data.label_column` (default: the last). Without an explicit test split,
`data.test_fraction` of the rows (seeded by `data.generator_seed`) is held out.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from gradwise.config import DataConfig
from gradwise.data.bundle import DataBundle, classification_bundle, split_indices
from gradwise.errors import DataError
from gradwise.io import read_text


FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_CLASSES = 100_000  # a label above this is not a class index (the output layer would have that many units)


def _check_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"data error: {where} labels must be 1-D, got shape {tuple(y.shape)}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_) or np.iscomplexobj(y):
        raise DataError(f"data error: {where} labels must be numbers (class indices), got dtype {y.dtype}")
    if y.size and (not np.all(np.isfinite(y)) or np.any(y < 0) or np.any(y != np.round(y))):
        raise DataError(f"data error: {where} labels must be non-negative integers (class indices)")
    if y.size and y.max() >= MAX_CLASSES:
        raise DataError(f"data error: {where} has a label of {int(y.max())}; labels are class indices "
                        f"0..{MAX_CLASSES - 1} (one output unit per class)")
    return y.astype(np.int64)


def _check_pair(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if x.ndim < 2:
        raise DataError(f"data error: {where} 'x' must have a sample axis and features, got shape {tuple(x.shape)}")
    if len(x) != len(y):
        raise DataError(f"data error: {where} has {len(x)} inputs but {len(y)} labels")
    if len(x) < 2:
        raise DataError(f"data error: {where} needs at least 2 samples, got {len(x)}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x) or not np.all(np.isfinite(x)):
        raise DataError(f"data error: {where} 'x' must be finite real numbers, got dtype {x.dtype}")
    if not x[0].size:
        raise DataError(f"data error: {where} 'x' has no features (shape {tuple(x.shape)})")
    if x.size and float(np.abs(x).max()) > FLOAT32_MAX:
        raise DataError(f"data error: {where} 'x' holds {float(np.abs(x).max()):.3g}, beyond float32's largest "
                        f"({FLOAT32_MAX:.3g}), the precision training reads inputs in; rescale it")


def _split(x: np.ndarray, y: np.ndarray, cfg: DataConfig, source: str) -> DataBundle:
    train, test = split_indices(len(y), cfg.test_fraction, cfg.generator_seed)
    tr, te = train.numpy(), test.numpy()
    return classification_bundle(x[tr], y[tr], x[te], y[te], info={"source": source})


def load_npz(path: Path, cfg: DataConfig) -> DataBundle:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as f:
                arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"data error: data.path='{path}' is not a readable .npz file ({type(err).__name__})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy (one array) under a .npz name
        raise DataError(f"data error: data.path='{path}' holds a single {type(loaded).__name__}, not a .npz archive "
                        "of named arrays; save it with np.savez(path, x=..., y=...)")
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"data error: data.path='{path}' lacks array(s) {missing}; a .npz needs 'x' and 'y' "
            f"(optionally 'x_test', 'y_test'); found {sorted(arrays)}"
        )
    x, y = arrays["x"], _check_labels(arrays["y"], f"'{path}'")
    _check_pair(x, y, f"'{path}'")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"data error: data.path='{path}' has only one of 'x_test'/'y_test'; give both or neither")
    if "x_test" in arrays:
        xt, yt = arrays["x_test"], _check_labels(arrays["y_test"], f"'{path}' test")
        _check_pair(xt, yt, f"'{path}' test")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"data error: '{path}' x_test shape {xt.shape[1:]} differs from x shape {x.shape[1:]}")
        return classification_bundle(x, y, xt, yt, info={"source": str(path)})
    return _split(x, y, cfg, str(path))


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def load_csv(path: Path, cfg: DataConfig) -> DataBundle:
    lines = read_text(path, DataError).splitlines()
    rows = [line for line in lines if line.strip()]
    if rows and not any(_number(cell) for cell in rows[0].split(",")):
        rows = rows[1:]  # a header row: names in every column (a row mixing names and numbers is a data row)
    if not rows:
        raise DataError(f"data error: data.path='{path}' has no data rows")
    width = len(rows[0].split(","))
    values = []
    for lineno, line in enumerate(rows, start=1):
        cells = line.split(",")
        if len(cells) != width:
            raise DataError(f"data error: '{path}' data row {lineno} has {len(cells)} columns, expected {width}")
        try:
            values.append([float(c) for c in cells])
        except ValueError:
            hint = " (if it is a header, give every column a name, e.g. x0,x1,label)" if lineno == 1 else ""
            raise DataError(f"data error: '{path}' data row {lineno} has a non-numeric value: {line[:60]!r}"
                            f"{hint}") from None
    table = np.asarray(values, dtype=np.float64)
    if width < 2:
        raise DataError(f"data error: '{path}' needs at least one feature column and a label column")
    col = cfg.label_column
    if not -width <= col < width:
        raise DataError(f"data error: data.label_column={col} is out of range for {width} columns")
    col %= width
    y = _check_labels(table[:, col], f"'{path}' column {col}")
    x = np.delete(table, col, axis=1)
    _check_pair(x, y, f"'{path}'")
    x = x.astype(np.float32)
    return _split(x, y, cfg, str(path))


def load_file(cfg: DataConfig) -> DataBundle:
    if not cfg.path:
        raise DataError(f"data error: data.name={cfg.name} needs data.path=FILE.{cfg.name}")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data error: data.path='{path}' does not exist or is not a file")
    return load_npz(path, cfg) if cfg.name == "npz" else load_csv(path, cfg)
