"""The errors gradwise raises for bad input, each mapped to exit status 2 by the CLI.

A `UserInputError` carries a one-line message that names what is wrong and what
is allowed; the CLI prints it without a traceback.
"""


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
