"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A crash at any point leaves either the old file or the new one, never half of
either; a failed write (a full disk) removes its temp file and raises the
OSError. Every file gradwise writes goes through `atomic_write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file handle whose contents replace `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # a failed write names no file: name ours
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _umask()


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries durable (a rename or a new file in it survives a power loss)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | Path, save: Callable[[IO[bytes]], None]) -> None:
    """Atomically write whatever `save(handle)` writes (e.g. torch.save, np.savez, savefig)."""
    with atomic_write(path, "wb") as handle:
        try:
            save(handle)
        except RuntimeError as err:  # torch.save reports a failed write (a full disk) as "unexpected pos"
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise
