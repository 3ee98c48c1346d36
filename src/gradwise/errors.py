"""The errors gradwise raises for bad input, each mapped to exit status 2 by the CLI.

A `UserInputError` carries a one-line message that names what is wrong and what
is allowed; the CLI prints it without a traceback.
"""

import errno
import re
import sys
from typing import Any, Callable


def one_line(err: BaseException | str) -> str:
    """A message as exactly one printable line: control characters a user's input carried (a newline in a key
    or a path, a NUL) shown escaped, as Python writes them in a string."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(err).strip())


class UserInputError(Exception):
    """Bad input from the user: config, command line, data file or checkpoint. Its message is one line, whatever
    the input it quotes (see `one_line`)."""

    label = "input error"  # how its one-line message starts

    def __init__(self, message: object = "", *args: object):
        super().__init__(one_line(str(message)), *args)


class ConfigError(UserInputError, ValueError):
    """A config key or value is invalid."""

    label = "config error"


class DataError(UserInputError, ValueError):
    """A data file is missing, unreadable or malformed."""

    label = "data error"


class CheckpointError(UserInputError, ValueError):
    """A checkpoint or run directory is unreadable, mismatched or would be overwritten."""

    label = "checkpoint error"


class ArgumentValueError(UserInputError, ValueError):
    """A Python API argument has a value outside what is allowed (also a ValueError)."""

    label = "argument error"


class ArgumentTypeError(UserInputError, TypeError):
    """A Python API argument has the wrong type (also a TypeError)."""

    label = "argument error"


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient and could not (or was told not to) recover."""


# A path the user gave that cannot be used is bad input (2); the machine failing a write (a full disk,
# an I/O error) is not (1). Either way the message is one line naming the file.
_BAD_PATH = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT,
             errno.ENAMETOOLONG, errno.ELOOP}


def os_error_status(err: OSError) -> int:
    return 2 if err.errno in _BAD_PATH else 1


def describe_os_error(err: OSError) -> str:
    kind = "input error" if os_error_status(err) == 2 else "write error"
    where = f" '{err.filename}'" if err.filename else ""
    return f"{kind}:{where} {err.strerror or err}".replace("\n", " ")


def run(main: Callable[[], Any]) -> Any:
    """Call a script's `main()` as gradwise's command line runs a command: bad input that escapes it (any
    UserInputError: a config, data, checkpoint or Python API argument error) prints its one line on stderr and
    exits with status 2, a NonFiniteError prints one line and exits 1; anything else propagates as usual.

        if __name__ == "__main__":
            gradwise.run(main)
    """
    try:
        return main()
    except UserInputError as err:
        print(f"gradwise: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as err:
        print(f"gradwise: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
