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
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DataError, OutputExistsError, UsageError
from ..faults import fault_point
from ..files import create_new_file
from ..sources.run import CHECKPOINT_NAME


def staging_path(output: Path) -> Path:
    return output.parent / f".{output.name}.bema-partial"


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.bema-lock"


def trash_path(output: Path) -> Path:
    return output.parent / f".{output.name}.bema-old"


def state_path(output: Path) -> Path:
    """Where `--no-keep-downloads` keeps its state (EMAs, sums, θ0) between checkpoints: a fixed name, so that the
    next run removes what a killed one left (it may be as large as the model, several times)."""
    return output.parent / f".{output.name}.bema-state"


def output_of(staging: Path) -> Path:
    """The output whose staging folder is `staging` (see `staging_path`)."""
    return staging.parent / staging.name[1:].removesuffix(".bema-partial")


def leftovers(output: Path) -> list[Path]:
    """What a killed run left beside `output` (staging folder, lock file, old output, state of `--no-keep-downloads`),
    if no run holds the lock."""
    found = [path for path in (staging_path(output), lock_path(output), trash_path(output), state_path(output)) if os.path.lexists(path)]
    if found and _lock_is_held(lock_path(output)):
        return []
    return found


def _lock_is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
    """Refuse an output that could change an input.

    Refused: an output that exists (unless `overwrite`); one that is or holds an input folder, or lies inside a
    model folder being read; one inside the run folder that is, or is named like, a checkpoint (the next run would
    read it as one); and one holding any file that an input folder's files are (by device and inode: a link or a hard
    link from an input into the output would change the input when the output is replaced). Another folder inside
    the run's folder is fine (the default output is `RUN/bema-offline`).
    """
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
    run = run_dir.resolve()
    if resolved.is_relative_to(run) and resolved != run:
        first = resolved.relative_to(run).parts[0]
        if CHECKPOINT_NAME.fullmatch(first):
            raise UsageError(
                f"--output {output}: {run / first} is named like a checkpoint of the run, so it would replace one or "
                "be read as one by the next run; choose another folder (e.g. RUN/bema-offline)"
            )
    if os.path.lexists(output) and not overwrite:
        left = leftovers(output)
        hint = f"; a killed run also left {' '.join(map(str, left))}: delete them (rm -r)" if left else ""
        raise OutputExistsError(
            f"--output {output} already exists; pass --overwrite to replace it, or choose another folder{hint}"
        )
    if os.path.isdir(output):
        _refuse_shared_files(output, source_folders)


def _refuse_shared_files(output: Path, source_folders: list[Path]) -> None:
    """Refuse an existing output (about to be replaced) that holds a file an input folder also holds, through a link
    or a hard link."""
    inputs: dict[tuple[int, int], Path] = {}
    for folder in source_folders:
        for entry in _entries(folder):
            try:
                status = os.stat(entry)  # links followed: where the input's bytes really are
            except OSError:
                continue
            inputs[(status.st_dev, status.st_ino)] = entry
    for root, _, files in os.walk(output):  # links in the output are not followed
        for name in files:
            path = Path(root, name)
            status = os.lstat(path)
            shared = inputs.get((status.st_dev, status.st_ino))
            if shared is not None and not os.path.islink(path):
                raise UsageError(
                    f"--output {output}: its file {path} is the input {shared} (a link or a hard link), so replacing "
                    "the output would change the input; choose another folder"
                )


def _entries(folder: Path) -> list[Path]:
    try:
        return [folder / name for name in os.listdir(folder)]
    except OSError:
        return []


class OutputLock:
    """An exclusive, non-blocking lock on an output path, held for the whole run.

    The lock file is created by this run (`O_EXCL | O_NOFOLLOW`) and written to only then. One left by a killed run
    is removed (by name, never opened for writing) once it is shown to be a small, unlocked file of this tool's; a
    link or anything else at the lock's path is refused, so that a planted link cannot make the run write through it.
    """

    def __init__(self, output: Path) -> None:
        self.path = lock_path(output)
        self.output = output
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = create_new_file(self.path)
            except FileExistsError:
                self._remove_stale()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != _identity(self.path):
                    raise BlockingIOError  # another run replaced it between the create and the lock
            except BlockingIOError:
                os.close(fd)
                continue
            self._fd = fd
            break
        else:
            raise UsageError(
                f"--output {self.output} is being written by another bema-offline run; wait for it to finish or choose "
                "another folder"
            )
        try:
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            self.release()
            raise DataError(f"{self.path}: cannot write the lock file ({e.strerror or e}); free some disk space or choose another --output") from e
        except BaseException:
            self.release()
            raise
        return self

    def _remove_stale(self) -> None:
        """Remove the lock file a killed run left, after checking that it is one; refuse if a live run holds it."""
        try:
            status = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1 or status.st_size > 32:
            raise UsageError(
                f"{self.path}: not a lock file of bema-offline's (a link, a folder, or a file with other content); "
                "remove it if no run is writing this output"
            )
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UsageError(
                f"--output {self.output} is being written by another bema-offline run (pid {holder}); "
                "wait for it to finish or choose another folder"
            ) from None
        finally:
            os.close(fd)
        if _identity(self.path) == (status.st_dev, status.st_ino):
            os.unlink(self.path)

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file and give up the lock (again: a no-op)."""
        if self._fd is not None:
            fault_point("unlock")
            if _identity(self.path) == (os.fstat(self._fd).st_dev, os.fstat(self._fd).st_ino):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


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
            fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
