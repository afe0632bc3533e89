"""File access that inputs cannot turn against the tool: identities, bounded reads, exclusive creates.

Three promises rest on this module:

- **An input that changes during a run is noticed.** Every input file is identified when its header is read
  (`FileIdentity`: device, inode, size, modification and change times); `OpenFiles` checks the identity of every
  file it opens against it, and `check_unchanged` checks again after the last read, so an output never mixes the
  bytes of two versions of a checkpoint.
- **Small side files cannot hang or exhaust the process.** `read_small_file` opens without blocking (a FIFO), reads
  regular files only (not `/dev/zero`), and refuses anything larger than its cap.
- **Nothing the tool did not create is written through.** Output files are created with `O_EXCL | O_NOFOLLOW`
  (`create_new_file`), so a link planted where an output file goes is never followed and an existing file is never
  truncated.

Reads and writes are positioned (`pread`/`pwrite`) into the caller's buffers, rather than memory-mapped, so the pages
of the input files stay out of the process's resident set: peak RSS stays at what the engine allocates.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BemaError, DataError
from .faults import fault_point

if TYPE_CHECKING:
    import torch

SMALL_FILE_LIMIT = 100_000_000  # JSON side files (configs, indexes, trainer_state.json): the safetensors header cap


@dataclass(frozen=True)
class FileIdentity:
    """What identifies one version of a file: rewriting it in place changes the times, replacing it the inode."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)

    def change(self, now: FileIdentity) -> str | None:
        """How `now` differs from this identity, in words, or None."""
        if (now.device, now.inode) != (self.device, self.inode):
            return "it was replaced by another file"
        if now.size != self.size:
            return f"its size changed from {self.size} to {now.size} bytes"
        if (now.mtime_ns, now.ctime_ns) != (self.mtime_ns, self.ctime_ns):
            return "it was rewritten (its modification time changed)"
        return None


def file_identity(path: Path) -> FileIdentity:
    """The identity of the file at `path` (links followed: an input may be a link into the Hub cache)."""
    try:
        return FileIdentity.of(os.stat(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def changed_input_error(path: Path, change: str) -> DataError:
    return DataError(
        f"{path}: {change} while this run was reading it; the output would mix two versions. "
        "Rerun once nothing writes to the checkpoints (is the training job still saving?)"
    )


def check_unchanged(identities: Mapping[Path, FileIdentity]) -> None:
    """Raise a `DataError` naming the first input file whose identity changed since it was recorded."""
    for path, identity in identities.items():
        try:
            now = FileIdentity.of(os.stat(path))
        except OSError:
            raise changed_input_error(path, "it disappeared") from None
        change = identity.change(now)
        if change:
            raise changed_input_error(path, change)


def read_small_file(path: Path, *, limit: int = SMALL_FILE_LIMIT, what: str = "file", refuse: type[BemaError] = DataError) -> bytes:
    """The bytes of a small regular file (a config, an index, `trainer_state.json`, a sweep file).

    The file is opened without blocking, so a FIFO cannot hang the run; a device (`/dev/zero`), a folder or a file
    larger than `limit` bytes is refused.

    Args:
        refuse (`type[BemaError]`, defaults to `DataError`): the error for a file that cannot be opened or is not a
            regular file (`UsageError` where the user named it on the command line).

    Raises:
        `DataError` (or `refuse`): not a regular file, too large, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise refuse(f"{path}: cannot read the {what} ({getattr(e, 'strerror', None) or e})") from e
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise refuse(f"{path}: the {what} is not a regular file; give the file itself")
        if status.st_size > limit:
            raise DataError(f"{path}: the {what} has {status.st_size} bytes, more than {limit}; it cannot be a real {what}")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise DataError(f"{path}: the {what} grew past {limit} bytes while being read")
        return b"".join(chunks)
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    finally:
        os.close(fd)


def parse_json(raw: bytes | str, *, what: str, hint: str) -> object:
    """`json.loads`, with every way it can fail on hostile bytes turned into one `DataError` line.

    Besides malformed JSON, that covers invalid UTF-8, nesting deep enough to exhaust the recursion limit, and
    integers too long for Python to convert.
    """
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        raise DataError(f"{what} ({reason}); {hint}") from e


def read_json_file(path: Path, *, what: str, hint: str, limit: int = SMALL_FILE_LIMIT) -> object:
    """`read_small_file` then `parse_json`: a JSON side file, bounded and in one `DataError` line when bad."""
    return parse_json(read_small_file(path, limit=limit, what=what), what=f"{path}: malformed {what}", hint=hint)


def create_new_file(path: Path, mode: int = 0o644) -> int:
    """Create `path` for writing and return its descriptor; never follows a link there and never opens a file that
    exists (`O_EXCL | O_NOFOLLOW`): whatever lies at `path` was not made by this run, so it is not written through.

    Raises:
        `FileExistsError`: something (a file, a link, a folder) is already at `path`.
    """
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_new_file(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write `data` to a file this call creates (see `create_new_file`), flushed to disk if `fsync`."""
    fd = create_new_file(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` as a new file at `path`, removing what an interrupted run may have left there first (a file or a
    link is unlinked by name, never followed or truncated)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    write_new_file(path, data)


def writable_view(buffer: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes, for `os.preadv` to read into."""
    array = (ctypes.c_char * buffer.nbytes).from_address(buffer.data_ptr())
    return memoryview(array).cast("B")


def _load_libc_function(name: str, argtypes: list):
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = argtypes
    return function


_sync_file_range = _load_libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2
_fallocate = _load_libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
_fstatfs = _load_libc_function("fstatfs", [ctypes.c_int, ctypes.c_void_p])
_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_MEMORY_FILE_SYSTEMS = {0x01021994, 0x858458F6}  # tmpfs, ramfs: fallocate would zero every page before it is written


def _in_memory(fd: int) -> bool:
    """Whether the file lives on tmpfs or ramfs (Linux `fstatfs`; its first field, `f_type`, is a C long)."""
    if _fstatfs is None:
        return False
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _fstatfs(fd, buffer) != 0:
        return False
    return ctypes.c_long.from_buffer(buffer).value in _MEMORY_FILE_SYSTEMS


def preallocate(fd: int, size: int) -> None:
    """Reserve the disk blocks of the first `size` bytes of a file (Linux `fallocate`), so that writing them later
    allocates nothing: on ext4 that makes writing a new file about 5x cheaper in CPU, and a full disk fails here,
    at once, rather than in the middle of a run. A no-op where the file system or the OS cannot do it, and on
    tmpfs (where it would only add a pass zeroing the pages).

    Raises:
        `OSError`: no space (ENOSPC), quota (EDQUOT), file size limit (EFBIG) or an I/O error.
    """
    if _fallocate is None or size == 0 or _in_memory(fd):
        return
    if _fallocate(fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code not in _NOT_SUPPORTED:
            raise OSError(code, os.strerror(code))


class OpenFiles:
    """Positioned reads or writes on many files, keeping at most `max_open` open (least recently used closed).

    With `max_open=None` no file is closed before `close_file` or `close`: then several threads may read or write
    at once (the file table is locked; positioned I/O needs no more).

    Args:
        writable (`bool`, defaults to False): open for writing (files this run created; links are not followed).
        max_open (`int | None`, defaults to 64): most files open at once.
        identities (`Mapping[Path, FileIdentity]`, *optional*): the identity each file had when it was planned;
            a file opened with another identity (rewritten or replaced since) is refused.
    """

    def __init__(
        self, *, writable: bool = False, max_open: int | None = 64, identities: Mapping[Path, FileIdentity] | None = None
    ) -> None:
        # (O_NONBLOCK: a path replaced by a FIFO since it was planned fails its identity check instead of blocking)
        self.flags = (os.O_WRONLY | os.O_NOFOLLOW if writable else os.O_RDONLY | os.O_NONBLOCK) | os.O_CLOEXEC
        self.max_open = max_open
        self.identities = identities
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                fd = self._open(path)
                while self.max_open is not None and len(self._fds) >= self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[path] = fd
            return fd

    def _open(self, path: Path) -> int:
        try:
            fd = os.open(path, self.flags)
        except OSError as e:
            raise DataError(f"{path}: cannot open ({e.strerror or e})") from e
        expected = self.identities.get(path) if self.identities is not None else None
        if expected is not None:
            change = expected.change(FileIdentity.of(os.fstat(fd)))
            if change:
                os.close(fd)
                raise changed_input_error(path, change)
        return fd

    def close_file(self, path: Path) -> None:
        """Close `path` if it is open (no thread may be using it)."""
        with self._lock:
            fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def read_into(self, path: Path, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes of `path` starting at `offset`."""
        fd = self._fd(path)
        done = 0
        while done < len(view):
            try:
                fault_point("read")
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise DataError(f"{path}: read error at byte {offset + done} ({e.strerror or e})") from e
            if n == 0:
                raise DataError(f"{path}: file ended at byte {offset + done} while reading; it was truncated during the run")
            done += n

    def write_at(self, path: Path, offset: int, view: memoryview) -> None:
        """Write all of `view` into `path` at `offset`."""
        fd = self._fd(path)
        done = 0
        while done < len(view):
            try:
                fault_point("write")
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as e:
                raise DataError(f"{path}: write failed ({e.strerror or e}); free some disk space or choose another --output") from e

    def start_writeback(self, path: Path) -> None:
        """Ask the kernel to start writing `path`'s dirty pages to disk now, without waiting (Linux; elsewhere a
        no-op). Writing back while the run goes on leaves little for the final fsync to wait for."""
        if _sync_file_range is not None:
            _sync_file_range(self._fd(path), 0, 0, _SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
