"""The errors gradwise raises for bad input, each mapped to exit status 2 by the CLI.

A `UserInputError` carries a one-line message that names what is wrong and what
is allowed; the CLI prints it without a traceback.
"""

import errno


class UserInputError(Exception):
    """Bad input from the user: config, command line, data file or checkpoint."""


class ConfigError(UserInputError):
    """A config key or value is invalid."""


class DataError(UserInputError):
    """A data file is missing, unreadable or malformed."""


class CheckpointError(UserInputError):
    """A checkpoint or run directory is unreadable, mismatched or would be overwritten."""


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
