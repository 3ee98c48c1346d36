"""A character-level corpus from local text files (default: the Python standard library's `.py` sources).

Files are read in sorted path order until `data.max_chars` characters; the first
(1 - test_fraction) of the text trains, the rest tests. Samples are
non-overlapping windows: input = chars[i:i+T], target = chars[i+1:i+T+1].
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from gradwise.config import DataConfig
from gradwise.data.bundle import DataBundle
from gradwise.errors import DataError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"data error: data.path='{path}' does not exist (need a text file or a folder of text files)")
    suffixes = {".py"} if path == default_corpus_dir() else TEXT_SUFFIXES
    found = []
    for folder, subfolders, names in os.walk(path):  # installed packages are not the corpus: not even walked
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "__pycache__")]
        found += [Path(folder) / n for n in names if Path(n).suffix in suffixes]
    files = sorted(p for p in found if p.is_file())
    if not files:
        raise DataError(f"data error: data.path='{path}' holds no text files ({', '.join(sorted(suffixes))})")
    return files


def read_corpus(files: list[Path], max_chars: int) -> str:
    pieces, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable files in a folder are skipped
        pieces.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(pieces)[:max_chars]


def windows(ids: torch.Tensor, context: int) -> TensorDataset:
    n = (len(ids) - 1) // context
    if n < 1:
        raise DataError(f"data error: split of {len(ids)} characters is shorter than model.context={context} + 1")
    x = ids[: n * context].view(n, context)
    y = ids[1 : n * context + 1].view(n, context)
    return TensorDataset(x.clone(), y.clone())


def load_text(cfg: DataConfig, context: int) -> DataBundle:
    root = Path(cfg.path) if cfg.path else default_corpus_dir()
    files = corpus_files(root)
    text = read_corpus(files, cfg.max_chars)
    if not text:
        raise DataError(f"data error: data.path='{root}' holds no readable UTF-8 text")
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    cut = int(len(ids) * (1 - cfg.test_fraction))
    return DataBundle(
        train=windows(ids[:cut], context),
        test=windows(ids[cut:], context),
        task="language_model",
        num_classes=len(vocab),
        input_shape=(context,),
        info={"source": str(root), "files": len(files), "chars": len(text), "vocab": "".join(vocab)},
    )
