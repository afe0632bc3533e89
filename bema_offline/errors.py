"""Errors that are part of the interface: each is one line that names what is wrong and what to do."""

from __future__ import annotations


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (`\\n`), as a file name may hold them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)


def first_line(error: BaseException) -> str:
    """An error's message, first line only (a library's may run to many), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def steps_text(steps, limit: int = 12, *, total: int | None = None) -> str:
    """Steps for a message: the first `limit`, and how many there are in all (`total`, when more exist than given)."""
    steps = sorted(steps)
    total = len(steps) if total is None else total
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f", ... ({total} in all)" if total > limit else "")


class BemaError(Exception):
    """Base class. `exit_code` is what the command line exits with. The message is always one line."""

    exit_code = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(str(message)))


class UsageError(BemaError):
    """Bad options or parameters (exit code 2)."""

    exit_code = 2


class DataError(BemaError):
    """Bad or inconsistent input data: checkpoints, base model, files (exit code 1)."""

    exit_code = 1


class OutputExistsError(UsageError):
    """The output folder exists and `overwrite` was not asked for."""
