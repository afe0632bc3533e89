"""Atomic output: a lock per output path, a staging folder beside it, and one rename at the end.

At `--output` there is either nothing (or what was there before) or a complete folder, whatever happens to the
process. The staging folder `.NAME.bema-partial` and the lock `.NAME.bema-lock` live in the output's parent.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from .errors import OutputExistsError, UsageError


def staging_path(output: Path) -> Path:
    return output.parent / f".{output.name}.bema-partial"


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.bema-lock"


def check_output(output: Path, *, overwrite: bool, run_dir: Path, source_folders: list[Path]) -> None:
    """Refuse an output that exists (unless `overwrite`), that is or holds an input, or that lies inside a model
    folder being read. An output inside the run's folder is fine."""
    resolved = output.resolve()
    for folder in [run_dir, *source_folders]:
        if folder.resolve().is_relative_to(resolved):
            raise UsageError(f"--output {output} is or contains the input {folder}; choose another folder")
    for folder in source_folders:
        if resolved.is_relative_to(folder.resolve()):
            raise UsageError(f"--output {output} lies inside the input {folder}; choose another folder")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"--output {output} already exists; pass --overwrite to replace it, or choose another folder")


class OutputLock:
    """An exclusive, non-blocking lock on an output path, held for the whole run."""

    def __init__(self, output: Path) -> None:
        self.path = lock_path(output)
        self.output = output
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"--output {self.output} is being written by another bema-offline run (pid {holder}); "
                "wait for it to finish or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def fresh_staging(output: Path) -> tuple[Path, bool]:
    """An empty staging folder for `output`; says whether leftovers of an interrupted run were removed."""
    staging = staging_path(output)
    leftovers = staging.exists()
    if leftovers:
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging, leftovers


def publish(staging: Path, output: Path, *, overwrite: bool) -> None:
    """Move the finished staging folder to `output` with a rename; an old output is replaced only if allowed."""
    _fsync_dir(staging)
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"--output {output} appeared during the run; pass --overwrite to replace it")
        trash = output.parent / f".{output.name}.bema-old"
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(output, trash)
        os.rename(staging, output)
        shutil.rmtree(trash)
    else:
        os.rename(staging, output)
    _fsync_dir(output.parent)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
