"""Atomic output: a lock per output path, a staging folder beside it, and one rename at the end.

At `--output` there is either nothing (or what was there before) or a complete folder, whatever happens to the
process. The staging folder `.NAME.bema-partial` and the lock `.NAME.bema-lock` live in the output's parent.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DataError, OutputExistsError, UsageError
from ..faults import fault_point


def staging_path(output: Path) -> Path:
    return output.parent / f".{output.name}.bema-partial"


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.bema-lock"


def trash_path(output: Path) -> Path:
    return output.parent / f".{output.name}.bema-old"


def leftovers(output: Path) -> list[Path]:
    """What a killed run left beside `output` (staging folder, lock file, old output), if no run holds the lock."""
    found = [path for path in (staging_path(output), lock_path(output), trash_path(output)) if os.path.lexists(path)]
    if found and _lock_is_held(lock_path(output)):
        return []
    return found


def _lock_is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def check_output(output: Path, *, overwrite: bool, run_dir: Path, source_folders: list[Path]) -> None:
    """Refuse an output that exists (unless `overwrite`), that is or holds an input, or that lies inside a model
    folder being read. An output inside the run's folder is fine."""
    try:
        resolved = output.resolve()
    except (OSError, RuntimeError) as e:  # Python 3.11 raises RuntimeError on a symlink loop
        raise UsageError(f"--output {output}: cannot resolve the path ({e}); a link loop? choose another folder") from e
    for folder in [run_dir, *source_folders]:
        if folder.resolve().is_relative_to(resolved):
            raise UsageError(f"--output {output} is or contains the input {folder}; choose another folder")
    for folder in source_folders:
        if resolved.is_relative_to(folder.resolve()):
            raise UsageError(f"--output {output} lies inside the input {folder}; choose another folder")
    if os.path.lexists(output) and not overwrite:
        left = leftovers(output)
        hint = f"; a killed run also left {' '.join(map(str, left))}: delete them (rm -r)" if left else ""
        raise OutputExistsError(
            f"--output {output} already exists; pass --overwrite to replace it, or choose another folder{hint}"
        )


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
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            self.release()
            raise DataError(f"{self.path}: cannot write the lock file ({e.strerror or e}); free some disk space or choose another --output") from e
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file and give up the lock (again: a no-op)."""
        if self._fd is not None:
            fault_point("unlock")
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def fresh_staging(output: Path) -> tuple[Path, bool]:
    """An empty staging folder for `output`; says whether leftovers of an interrupted run were removed."""
    staging = staging_path(output)
    leftovers = os.path.lexists(staging)
    if leftovers:
        remove_path(staging)
    staging.mkdir(parents=True)
    return staging, leftovers


def publish(staging: Path, output: Path, *, overwrite: bool) -> None:
    """Move the finished staging folder to `output` with a rename; an old output is replaced only if allowed.

    Every file is flushed to disk first. An old output is swapped with the new one in one atomic exchange
    (`renameat2(RENAME_EXCHANGE)`) where the system has it, so `output` is never missing, and then removed.
    """
    _fsync_tree(staging)
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"--output {output} appeared during the run; pass --overwrite to replace it")
        fault_point("publish")
        if _exchange(staging, output):
            fault_point("renamed")
            remove_path(staging)  # now the old output
        else:
            trash = trash_path(output)
            remove_path(trash)
            os.rename(output, trash)
            os.rename(staging, output)
            fault_point("renamed")
            remove_path(trash)
    else:
        fault_point("publish")
        os.rename(staging, output)
        fault_point("renamed")
    _fsync_dir(output.parent)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold off Ctrl-C (SIGINT) while publishing: once the rename is under way the run finishes, and a Ctrl-C
    that arrived meanwhile is dropped, so that the output is never complete while the run reports it missing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree, if there is one."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so that a published output survives a power cut."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
