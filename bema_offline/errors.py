"""Errors that are part of the interface: each is one line that names what is wrong and what to do."""

from __future__ import annotations


class BemaError(Exception):
    """Base class. `exit_code` is what the command line exits with."""

    exit_code = 1


class UsageError(BemaError):
    """Bad options or parameters (exit code 2)."""

    exit_code = 2


class DataError(BemaError):
    """Bad or inconsistent input data: checkpoints, base model, files (exit code 1)."""

    exit_code = 1


class OutputExistsError(UsageError):
    """The output folder exists and `overwrite` was not asked for."""
