"""Files in and out: atomic writes, and reads that turn any damage into one line naming the file.

A write goes to a temp file in the same folder, fsync, then rename: a crash at
any point leaves either the old file or the new one, never half of either; a
failed write (a full disk) removes its temp file and raises the OSError. Every
file gradwise writes goes through `atomic_write`; every text file it reads
(configs, run files, data) through `read_text`, `read_json` or `read_jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from gradwise.errors import CheckpointError, UserInputError


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


def read_text(path: str | Path, error: type[UserInputError] = CheckpointError) -> str:
    """The UTF-8 text of `path` (a byte-order mark is dropped); a file that is missing, unreadable or in another
    encoding raises `error` with one line naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{error.label}: '{path}' is not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}); "
                    "save it as UTF-8") from None
    except OSError as err:
        raise error(f"{error.label}: cannot read '{path}': {err.strerror or type(err).__name__}") from None


def parse_json(text: str, where: str, error: type[UserInputError] = CheckpointError) -> Any:
    """`text` as JSON; invalid or nested past Python's limit: `error` naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{error.label}: {where} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except (RecursionError, ValueError) as err:  # nesting past the limit; a number too long to read
        raise error(f"{error.label}: {where} cannot be read as JSON ({type(err).__name__})") from None


def read_json(path: str | Path, error: type[UserInputError] = CheckpointError, kind: type = dict) -> Any:
    """A JSON file holding a `kind` (an object by default); anything else raises `error` naming the file."""
    value = parse_json(read_text(path, error), f"'{path}'", error)
    if not isinstance(value, kind):
        raise error(f"{error.label}: '{path}' holds a JSON {type(value).__name__}, not a JSON "
                    f"{'object' if kind is dict else kind.__name__}")
    return value


def read_jsonl(path: str | Path, error: type[UserInputError] = CheckpointError) -> list[dict[str, Any]]:
    """The records (JSON objects, one a line) of a JSON-lines file; a torn last line (a write the process did not
    finish) is skipped, any other bad line raises `error` naming the file and the line."""
    lines = read_text(path, error).splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"'{path}' line {number}", error)
        except UserInputError:
            if number == len(lines):
                break
            raise
        if not isinstance(record, dict):
            raise error(f"{error.label}: '{path}' line {number} holds a JSON {type(record).__name__}, not a record")
        records.append(record)
    return records


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
