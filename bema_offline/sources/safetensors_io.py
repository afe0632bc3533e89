"""Just enough of the safetensors format to read tensors lazily with `pread` and to write shards in place.

Reading through `pread` into our own buffers, rather than through `safe_open`'s memory map, keeps the pages of
the input files out of the process's resident set: peak RSS stays at what we allocate.

Format: 8 bytes little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}, ...}`
(plus an optional `__metadata__` of strings), then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from ..faults import fault_point

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dtype:
    """A safetensors dtype: its name in headers, its size, and torch's name for it (torch is imported only where a
    tensor is made)."""

    name: str
    itemsize: int
    is_float: bool
    torch_name: str

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, Dtype] = {
    dtype.name: dtype
    for dtype in (
        Dtype("F64", 8, True, "float64"),
        Dtype("F32", 4, True, "float32"),
        Dtype("F16", 2, True, "float16"),
        Dtype("BF16", 2, True, "bfloat16"),
        Dtype("F8_E4M3", 1, True, "float8_e4m3fn"),
        Dtype("F8_E5M2", 1, True, "float8_e5m2"),
        Dtype("I64", 8, False, "int64"),
        Dtype("I32", 4, False, "int32"),
        Dtype("I16", 2, False, "int16"),
        Dtype("I8", 1, False, "int8"),
        Dtype("U64", 8, False, "uint64"),
        Dtype("U32", 4, False, "uint32"),
        Dtype("U16", 2, False, "uint16"),
        Dtype("U8", 1, False, "uint8"),
        Dtype("BOOL", 1, False, "bool"),
    )
}
# the `--dtype` and `--accum-dtype` names, as torch and config.json spell them
FLOAT_DTYPES = {"float32": "F32", "float64": "F64", "bfloat16": "BF16", "float16": "F16"}


def dtype_name(torch_dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    wanted = str(torch_dtype).removeprefix("torch.")
    return next(name for name, dtype in DTYPES.items() if dtype.torch_name == wanted)


MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype].torch

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype].is_float


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a safetensors file.

    Returns:
        `(tensors, metadata)`: the tensors by name, in file order, and the `__metadata__` strings.

    Raises:
        `DataError`: the file is truncated, its header is malformed or inconsistent with its size.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise DataError(f"{path}: truncated safetensors file ({size} bytes); re-save or remove this checkpoint")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise DataError(
                    f"{path}: safetensors header length {header_len} runs past the end of the file ({size} bytes); "
                    "the file is truncated or corrupt"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    header = parse_json(raw, what=f"{path}: malformed safetensors header", hint="the file is corrupt")
    if not isinstance(header, dict):
        raise DataError(f"{path}: malformed safetensors header (not a JSON object); the file is corrupt")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise DataError(f"{path}: malformed safetensors __metadata__ (not a JSON object); the file is corrupt")
    data_start = 8 + header_len
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.start, t.nbytes))
    previous = None
    for t in tensors:
        if previous is not None and t.start < previous.start + previous.nbytes:
            raise DataError(f"{path}: tensors {previous.name!r} and {t.name!r} overlap; the file is corrupt")
        previous = t
    if previous is not None and previous.start + previous.nbytes > size:
        raise DataError(
            f"{path}: tensor {previous.name!r} ends at byte {previous.start + previous.nbytes} "
            f"but the file has {size} bytes; the file is truncated"
        )
    return {t.name: t for t in tensors}, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: malformed header entry; the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DataError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise DataError(f"{where}: malformed shape {shape!r}; the file is corrupt")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise DataError(f"{where}: malformed data_offsets {offsets!r}; the file is corrupt")
    nbytes = offsets[1] - offsets[0]
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes != expected:
        raise DataError(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes but data_offsets span {nbytes}; the file is corrupt"
        )
    return TensorInfo(name=name, path=path, dtype=dtype, shape=tuple(shape), start=data_start + offsets[0], nbytes=nbytes)


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


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN or Inf (float8 tensors, which `isfinite` lacks, are upcast)."""
    import torch

    if tensor.dtype.itemsize == 1:
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


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
    """

    def __init__(self, *, writable: bool = False, max_open: int | None = 64) -> None:
        self.flags = os.O_WRONLY if writable else os.O_RDONLY
        self.max_open = max_open
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                try:
                    fd = os.open(path, self.flags)
                except OSError as e:
                    raise DataError(f"{path}: cannot open ({e.strerror or e})") from e
                while self.max_open is not None and len(self._fds) >= self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[path] = fd
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
