"""The PyTorch `.bin` reader: `pytorch_model.bin`, or the shards its index names, read without running the pickle.

`torch.save` writes a zip archive whose entries are stored, not compressed: `<archive>/data.pkl` pickles the state
dict, in which each tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and each
storage a persistent id `("storage", torch.FloatStorage, key, location, numel)` whose bytes are the entry
`<archive>/data/<key>`. This module parses the zip's central directory itself and reads the pickle with an unpickler
whose `find_class` hands out inert stand-ins: a tensor becomes a `StoredTensor` record, and nothing the pickle names
is ever imported or called. Each tensor then becomes extents in its storage's entry: a row-major tensor is one
extent, another view one extent per run of contiguous elements.

The same parser serves the other layouts that `torch.save` writes: the items of an FSDP distributed checkpoint (a zip
at an offset of a `.distcp` file) and DeepSpeed's partitions, which also pickle objects of DeepSpeed's own classes
(`opaque=True` turns those into `Opaque` records instead of refusing them).
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import math
import os
import pickle
import pickletools
import reprlib
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import DTYPES
from ..errors import DataError
from ..files import FileIdentity, read_json_file
from .safetensors_io import check_tensor_name
from .tensors import Extent, TensorInfo, WeightSource

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
PICKLE_LIMIT = 256 * 2**20  # a state dict's pickle is about 100 bytes per tensor
MAX_RUNS = 4096  # most extents a strided view may take before it is refused
_RESAVE = "re-save the weights as safetensors (model.save_pretrained(...), or save_safetensors=True in older transformers)"

# --- the zip archive ---------------------------------------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_TAIL = 8192  # bytes read from the end at first: the end records and, usually, the whole central directory


@dataclass(frozen=True)
class _Entry:
    name: str
    method: int
    compressed: int
    size: int
    header: int  # offset of the local header


class Region:
    """Bytes [start, start + size) of an open file, read with positioned reads (an archive, or one item of a
    `.distcp` file holding many)."""

    def __init__(self, fd: int, path: Path, start: int = 0, size: int | None = None) -> None:
        self.fd, self.path, self.start = fd, path, start
        self.size = os.fstat(fd).st_size - start if size is None else size
        self.label = str(path) if start == 0 and size is None else f"{path} (item at byte {start})"

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise DataError(f"{self.label}: the archive points past its end (byte {offset + n} of {self.size}); the file is truncated or corrupt")
        try:
            data = os.pread(self.fd, n, self.start + offset)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read ({e.strerror or e})") from e
        if len(data) != n:
            raise DataError(f"{self.label}: ended at byte {offset + len(data)} while reading; the file is truncated")
        return data


def _not_an_archive(region: Region, why: str) -> DataError:
    return DataError(
        f"{region.label}: {why}; it is not a torch.save zip archive (torch < 1.6 wrote a legacy format that is not "
        f"streamed, and a truncated file loses its directory at the end): {_RESAVE}"
    )


def _central_directory(region: Region) -> tuple[dict[str, _Entry], int]:
    """The entries of the zip archive in `region`, by name, and where its central directory starts (no entry's bytes
    may run past it)."""
    if region.size < _EOCD.size:
        raise _not_an_archive(region, f"only {region.size} bytes")
    tail_start = max(0, region.size - _TAIL)
    tail = region.read(tail_start, region.size - tail_start)
    at = len(tail) - _EOCD.size
    if tail[at : at + 4] != b"PK\x05\x06":  # torch writes no archive comment; search only if something else did
        tail_start = max(0, region.size - _EOCD.size - 0xFFFF)
        tail = region.read(tail_start, region.size - tail_start)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _EOCD.size > len(tail):
            raise _not_an_archive(region, "no zip end of central directory")
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    eocd = tail_start + at
    locator = eocd - _ZIP64_LOCATOR.size
    if locator >= 0 and region.read(locator, 4) == b"PK\x06\x07":
        _, _, zip64_offset, _ = _ZIP64_LOCATOR.unpack(region.read(locator, _ZIP64_LOCATOR.size))
        record = region.read(zip64_offset, _ZIP64_EOCD.size)
        if record[:4] != b"PK\x06\x06":
            raise _not_an_archive(region, "a broken zip64 end of central directory")
        _, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset = _ZIP64_EOCD.unpack(record)
        eocd = zip64_offset
    if disk != 0 or cd_disk != 0:
        raise DataError(f"{region.label}: a multi-part zip archive; torch.save never writes one, so the file is corrupt")
    if cd_offset + cd_size > eocd or cd_size > PICKLE_LIMIT:
        raise DataError(f"{region.label}: the zip central directory ({cd_size} bytes) runs past its end record or any real size; the file is corrupt")
    directory = tail[cd_offset - tail_start : cd_offset - tail_start + cd_size] if cd_offset >= tail_start else region.read(cd_offset, cd_size)
    entries: dict[str, _Entry] = {}
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(directory) or directory[pos : pos + 4] != b"PK\x01\x02":
            raise DataError(f"{region.label}: malformed zip central directory (entry {len(entries)}); the file is corrupt")
        fields = _CENTRAL.unpack_from(directory, pos)
        method, compressed, size, name_len, extra_len, comment_len, header = fields[4], *fields[8:13], fields[16]
        name_end = pos + _CENTRAL.size + name_len
        name = directory[pos + _CENTRAL.size : name_end].decode("utf-8", "replace")
        extra = directory[name_end : name_end + extra_len]
        size, compressed, header = _zip64_values(extra, size, compressed, header)
        pos = name_end + extra_len + comment_len
        if name in entries:
            raise DataError(f"{region.label}: the zip archive names {name!r} twice; the file is corrupt")
        entries[name] = _Entry(name, method, compressed, size, header)
    if pos > len(directory):
        raise DataError(f"{region.label}: malformed zip central directory (it overruns its size); the file is corrupt")
    return entries, cd_offset


def _zip64_values(extra: bytes, size: int, compressed: int, header: int) -> tuple[int, int, int]:
    """Sizes and offset from a zip64 extra field, for those the 32-bit fields mark as 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            size = next(values, size) if size == 0xFFFFFFFF else size
            compressed = next(values, compressed) if compressed == 0xFFFFFFFF else compressed
            header = next(values, header) if header == 0xFFFFFFFF else header
            break
        pos += 4 + length
    return size, compressed, header


def _data_start(region: Region, entry: _Entry, limit: int) -> int:
    """Where the bytes of a stored (uncompressed) entry begin, from its local header; checked to end before `limit`."""
    if entry.method != 0 or entry.compressed != entry.size:
        raise DataError(
            f"{region.label}: entry {entry.name!r} is compressed (zip method {entry.method}); torch.save stores "
            "every entry uncompressed, so the file was rewritten by another tool: load and re-save it with torch.save"
        )
    header = region.read(entry.header, _LOCAL.size)
    signature, *_, name_len, extra_len = _LOCAL.unpack(header)
    if signature != b"PK\x03\x04":
        raise DataError(f"{region.label}: no zip local header for entry {entry.name!r}; the file is corrupt")
    if region.read(entry.header + _LOCAL.size, name_len).decode("utf-8", "replace") != entry.name:
        raise DataError(f"{region.label}: the local header of entry {entry.name!r} names another entry; the file is corrupt")
    start = entry.header + _LOCAL.size + name_len + extra_len
    if start + entry.size > limit:
        raise DataError(f"{region.label}: entry {entry.name!r} runs past the zip directory (byte {start + entry.size}); the file is truncated or corrupt")
    return start


# --- the pickle --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storage:
    """A storage named by a persistent id: zip entry `data/<key>`, holding `numel` elements of `dtype`."""

    key: str
    dtype: str  # safetensors dtype name; "U8" for an untyped storage (a tensor of a newer dtype views its bytes)
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """A tensor as the pickle describes it: a view (offset, shape, stride, in elements) of a storage."""

    storage: object
    offset: object
    shape: object
    stride: object
    dtype: object = None  # set by `_rebuild_tensor_v3` (dtypes without a legacy storage class)
    metadata: object = None


class Opaque:
    """A stand-in for an object of a class a pickle names (with `opaque=True`): it keeps the arguments and state the
    pickle gives it, and nothing of the class itself is imported or run."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state, self.items = args, None, []
        return self

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def append(self, item) -> None:
        self.items.append(item)

    def extend(self, items) -> None:
        self.items.extend(items)

    def __setitem__(self, key, value) -> None:
        self.items.append((key, value))

    @property
    def fields(self) -> dict:
        """The attributes the pickle set (a dataclass's fields, an object's `__dict__`), or {}."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            return {**(state[0] or {}), **state[1]}
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


@dataclass(frozen=True)
class _Marker:
    """What a pickle gets for a storage class, a dtype, or a tensor type: a name, never a callable."""

    kind: str
    value: str


def _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad=False, hooks=None, metadata=None):
    return StoredTensor(storage, offset, shape, stride, None, metadata)


def _rebuild_tensor_v3(storage, offset, shape, stride, requires_grad, hooks, dtype, metadata=None):
    return StoredTensor(storage, offset, shape, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data


def _rebuild_from_type_v2(function, new_type, args, state):
    function = function.function if isinstance(function, _Callable) else None
    if function not in _REBUILDERS or not (isinstance(new_type, _Marker) and new_type.kind == "tensor type"):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 of something other than a tensor")
    return function(*args)


def _size(dims=()):
    return tuple(dims)


def _encode(text, encoding="utf-8"):  # how protocol 2 pickles bytes: _codecs.encode(text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode of something other than latin-1 text")
    return text.encode("latin-1")


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)
_LEGACY_STORAGES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}  # fmt: skip
_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker("tensor type", "torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("tensor type", "torch.nn.Parameter"),
    ("torch", "Size"): _size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _encode,
    ("torch", "UntypedStorage"): _Marker("storage", "U8"),
    ("torch.storage", "UntypedStorage"): _Marker("storage", "U8"),
    **{("torch", name): _Marker("storage", dtype) for name, dtype in _LEGACY_STORAGES.items()},
    **{("torch", dtype.torch_name): _Marker("dtype", name) for name, dtype in DTYPES.items()},
}


@dataclass(frozen=True, slots=True)
class _Callable:
    """A function of `_GLOBALS` as a pickle gets it: a fresh wrapper per lookup, so that a pickle's BUILD opcode,
    which sets attributes on what it is given, can change nothing another pickle gets (the function's defaults)."""

    function: Callable

    def __call__(self, *args):
        return self.function(*args)


OPAQUE_TYPES_LIMIT = 1000  # distinct classes an opaque pickle (an optimizer's, DCP's metadata) may name


class _Unpickler(pickle.Unpickler):
    """Builds `StoredTensor`s, `Storage`s and plain containers; any other global is refused (or, with `opaque`,
    becomes an `Opaque` type). `find_class` is the only way a pickle reaches code, so none of its own runs."""

    def __init__(self, data: bytes, label: str, *, opaque: bool) -> None:
        super().__init__(io.BytesIO(data))
        self.label, self.opaque = label, opaque
        self.storages: dict[str, Storage] = {}
        self._opaque_types: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        found = _GLOBALS.get((module, name))
        if isinstance(found, _Marker):  # a fresh copy: nothing the pickle does to it reaches the next pickle
            return _Marker(found.kind, found.value)
        if isinstance(found, type):  # OrderedDict, set, frozenset: built-in types, which no attribute can be set on
            return found
        if found is not None:
            return _Callable(found)
        if not self.opaque:
            raise DataError(
                f"{self.label}: the pickle needs {module}.{name}, which is neither a tensor nor a plain container; "
                "refused without running it (a weights file holds only tensors: re-save the state dict with torch.save, "
                "or as safetensors)"
            )
        key = (module, name)
        if key not in self._opaque_types and len(self._opaque_types) >= OPAQUE_TYPES_LIMIT:
            raise DataError(f"{self.label}: the pickle names more than {OPAQUE_TYPES_LIMIT} classes; the file is corrupt or hostile")
        if key not in self._opaque_types:
            qualname = f"{module}.{name}"
            self._opaque_types[key] = type(qualname, (Opaque,), {"qualname": qualname})
        return self._opaque_types[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"an unexpected persistent id {shown_value(pid)}")
        _, kind, key, _location, numel = pid
        if not (isinstance(kind, _Marker) and kind.kind == "storage" and isinstance(key, str)):
            raise pickle.UnpicklingError(f"a malformed storage id {shown_value(pid)}")
        if not isinstance(numel, int) or isinstance(numel, bool) or not 0 <= numel < 2**62:
            raise pickle.UnpicklingError(f"storage {key!r} has a malformed size {shown_value(numel)}")
        storage = Storage(key, kind.value, numel)
        if self.storages.setdefault(key, storage) != storage:
            raise pickle.UnpicklingError(f"storage {key!r} is named with two dtypes or sizes")
        return storage


_SHOWN = reprlib.Repr()  # (Python 3.11's takes no arguments)
_SHOWN.maxlevel, _SHOWN.maxtuple, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 3, 6, 6, 6, 60, 60


def shown_value(value: object) -> str:
    """A value from a pickle, for a message: bounded in depth and length (a tuple built by doubling through the memo
    would otherwise expand to 2**40 items)."""
    return _SHOWN.repr(value)


def unpickle(data: bytes, label: str, *, opaque: bool = False) -> tuple[object, dict[str, Storage]]:
    """Read a pickle without running any of its code.

    Args:
        data (`bytes`): the pickle.
        label (`str`): where it comes from, for messages.
        opaque (`bool`, defaults to False): turn objects of other classes into `Opaque` records instead of refusing.

    Returns:
        `(root, storages)`: the unpickled object (tensors as `StoredTensor`) and the storages it names, by key.

    Raises:
        `DataError`: a malformed pickle, or (without `opaque`) one that names anything beyond tensors and containers.
    """
    _check_memo(data, label)
    unpickler = _Unpickler(data, label, opaque=opaque)
    try:
        return unpickler.load(), unpickler.storages
    except DataError:
        raise
    except RecursionError:
        raise DataError(f"{label}: the pickle is nested too deeply; the file is corrupt") from None
    except Exception as e:  # every way a hostile pickle can fail: UnpicklingError, EOFError, TypeError, ...
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(f"{label}: malformed pickle ({reason}); the file is corrupt") from e


def _check_memo(data: bytes, label: str) -> None:
    """Refuse memo indexes no pickle of this size can need: CPython's unpickler sizes its memo to the largest index it
    is given, so a few bytes asking for index 2**31 would make it allocate and clear 32 GiB."""
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and argument > len(data):
                raise DataError(f"{label}: malformed pickle (memo index {argument} in a pickle of {len(data)} bytes); the file is corrupt")
    except ValueError as e:  # genops meets an unknown opcode or a truncated argument
        raise DataError(f"{label}: malformed pickle ({str(e).splitlines()[0][:200]}); the file is corrupt") from None


# --- an archive's tensors ----------------------------------------------------------------------------------------


class TorchArchive:
    """One `torch.save` archive: its unpickled object, and where the bytes of each of its tensors lie.

    Args:
        region (`Region`): where the archive lies (a whole file, or an item of a `.distcp` file).
        opaque (`bool`, defaults to False): accept objects of other classes as `Opaque` records (DeepSpeed).

    Example:

    ```python
    >>> with open_file(Path("pytorch_model.bin")) as region:
    ...     archive = TorchArchive(region)
    ...     info = archive.tensor_info("lm_head.weight", archive.root["lm_head.weight"])
    ```
    """

    def __init__(self, region: Region, *, opaque: bool = False) -> None:
        self.region = region
        self.entries, self._directory = _central_directory(region)
        first = next(iter(self.entries), "")  # torch names the archive's folder after its first entry's
        if "/" not in first:
            raise _not_an_archive(region, "no archive folder in the zip")
        self.prefix = first[: first.index("/") + 1]
        self._starts: dict[str, int] = {}
        order = self.entries.get(self.prefix + "byteorder")
        if order is not None and self._read_entry(order, 16) not in (b"little", b"little\n"):
            raise DataError(f"{region.label}: saved on a big-endian machine; load and re-save it on a little-endian one")
        pickled = self.entries.get(self.prefix + "data.pkl")
        if pickled is None:
            raise _not_an_archive(region, f"no {self.prefix}data.pkl in the zip")
        self.root, self.storages = unpickle(self._read_entry(pickled, PICKLE_LIMIT), region.label, opaque=opaque)

    def _read_entry(self, entry: _Entry, limit: int) -> bytes:
        if entry.size > limit:
            raise DataError(f"{self.region.label}: entry {entry.name!r} has {entry.size} bytes, more than {limit}; the file is corrupt")
        return self.region.read(_data_start(self.region, entry, self._directory), entry.size)

    def storage_start(self, storage: Storage) -> int:
        """The byte offset, in the file, of a storage's first byte (checked to be a stored entry of the right size)."""
        start = self._starts.get(storage.key)
        if start is None:
            entry = self.entries.get(f"{self.prefix}data/{storage.key}")
            if entry is None:
                raise DataError(f"{self.region.label}: storage {storage.key!r} has no zip entry; the file is truncated or corrupt")
            if entry.size != storage.nbytes:
                raise DataError(
                    f"{self.region.label}: storage {storage.key!r} should hold {storage.nbytes} bytes but its zip entry "
                    f"has {entry.size}; the file is corrupt"
                )
            start = self._starts[storage.key] = self.region.start + _data_start(self.region, entry, self._directory)
        return start

    def tensor_info(self, name: str, tensor: object) -> TensorInfo:
        """The `TensorInfo` of one tensor of the archive: its dtype, shape and extents in the file.

        Raises:
            `DataError`: `tensor` is not a tensor, is malformed, lies outside its storage, or is a view too scattered
                to stream (more than `MAX_RUNS` pieces).
        """
        where = f"{self.region.label}: tensor {name!r}"
        check_tensor_name(name, self.region.label)
        if not isinstance(tensor, StoredTensor):
            raise DataError(f"{where} is {_describe(tensor)}, not a tensor; this is not a state dict of tensors")
        storage, offset, shape, stride = tensor.storage, tensor.offset, tensor.shape, tensor.stride
        if not isinstance(storage, Storage):
            raise DataError(f"{where}: malformed tensor record (no storage); the file is corrupt")
        dtype = storage.dtype
        if tensor.dtype is not None:
            if not isinstance(tensor.dtype, _Marker) or tensor.dtype.kind != "dtype" or storage.dtype != "U8":
                raise DataError(f"{where}: malformed tensor record (dtype {shown_value(tensor.dtype)}); the file is corrupt")
            dtype = tensor.dtype.value
        if tensor.metadata:
            raise DataError(
                f"{where} carries tensor flags {shown_value(tensor.metadata)} (a conjugate or negative view), so its bytes are not "
                "its values; re-save it after .resolve_conj().resolve_neg()"
            )
        if not (_is_ints(shape) and _is_ints(stride) and len(shape) == len(stride) and _is_ints((offset,))):
            raise DataError(f"{where}: malformed shape {shown_value(shape)}, stride {shown_value(stride)} or offset {shown_value(offset)}; the file is corrupt")
        itemsize = DTYPES[dtype].itemsize
        if storage.nbytes % itemsize:
            raise DataError(f"{where}: its storage of {storage.nbytes} bytes is not a whole number of {dtype} elements; the file is corrupt")
        numel = math.prod(shape)
        if numel == 0:
            return TensorInfo(name, dtype, tuple(shape), (Extent(self.region.path, self.storage_start(storage), 0, 0),))
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if last >= storage.nbytes // itemsize:
            raise DataError(
                f"{where}: shape {list(shape)} with stride {list(stride)} at offset {offset} runs past its storage of "
                f"{storage.nbytes // itemsize} elements; the file is corrupt"
            )
        runs = view_runs(shape, stride)
        if runs is None:
            raise DataError(
                f"{where} is a non-contiguous view (shape {list(shape)}, stride {list(stride)}) too scattered to stream "
                f"(over {MAX_RUNS} pieces); re-save it with tensor.contiguous()"
            )
        start = self.storage_start(storage) + offset * itemsize
        path = self.region.path
        return TensorInfo(name, dtype, tuple(shape), tuple(Extent(path, start + s * itemsize, f, f + n) for f, s, n in runs))


def view_runs(shape, stride, *, limit: int = MAX_RUNS) -> list[tuple[int, int, int]] | None:
    """The runs of a strided view: `(first element, storage element, length)` for each piece whose elements lie back
    to back in its storage, in element order; None when there would be more than `limit` pieces."""
    run, inner = 1, len(shape)  # the trailing dims [inner:] are stored back to back: one run
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != run:
            break
        run *= n
        inner -= 1
    outer_shape, outer_stride = shape[:inner], stride[:inner]
    if math.prod(outer_shape) > limit:
        return None
    runs = []
    for first, index in enumerate(itertools.product(*map(range, outer_shape))):
        runs.append((first * run, sum(i * s for i, s in zip(index, outer_stride)), run))
    return runs


def _is_ints(values: object) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in values)


def _describe(value: object) -> str:
    if isinstance(value, Opaque):
        return f"an object of {value.qualname}"
    return f"an object of type {type(value).__name__}"


@contextlib.contextmanager
def open_file(path: Path, identities: dict[Path, FileIdentity] | None = None) -> Iterator[Region]:
    """Open a regular file for reading (without blocking: a FIFO is refused, not waited on), record its identity as
    it is while read, and give the whole file as a `Region`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise DataError(f"{path}: not a regular file; replace it with the file the run saved")
        if identities is not None:
            identities[path] = FileIdentity.of(status)
        yield Region(fd, path)
    finally:
        os.close(fd)


# --- the folder --------------------------------------------------------------------------------------------------


def read_state_dict(path: Path, identities: dict[Path, FileIdentity] | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one `torch.save`d state dict, by name, and the tied ones left out.

    A tensor that views the very same bytes as an earlier one (tied weights, e.g. `lm_head.weight` sharing the input
    embeddings' storage) is left out, as `save_pretrained` leaves it out.

    Returns:
        `(tensors, tied)`: the tensors by name, in the file's order, and each tensor left out -> the one it ties to.

    Raises:
        `DataError`: not a flat dict of tensors, or a malformed archive.
    """
    with open_file(path, identities) as region:
        archive = TorchArchive(region)
        state_dict = archive.root
        if not isinstance(state_dict, dict):
            raise DataError(f"{path}: holds {_describe(state_dict)}, not a state dict (a dict of tensor names to tensors)")
        tensors: dict[str, TensorInfo] = {}
        views: dict[tuple, str] = {}
        tied: dict[str, str] = {}
        for name, tensor in state_dict.items():
            if not isinstance(name, str):
                raise DataError(f"{path}: a state dict key is {_describe(name)}, not a tensor name; this is not a model state dict")
            info = archive.tensor_info(name, tensor)
            view = (info.dtype, info.shape, info.extents)
            if view in views:
                tied[name] = views[view]
            else:
                views[view] = name
                tensors[name] = info
    return tensors, tied


def tied_note(tied: dict[str, str]) -> tuple[str, ...]:
    """The note saying which tied tensors were left out."""
    if not tied:
        return ()
    shown = ", ".join(f"{name} (= {origin})" for name, origin in list(tied.items())[:4])
    return (f"{len(tied)} tensors share their bytes with another (tied weights) and were left out, as save_pretrained leaves them out: {shown}",)


def load_torch_bin(folder: Path, step: int) -> WeightSource:
    """Read the tensor records of one model folder saved as PyTorch `.bin`: `pytorch_model.bin`, else the shards its
    index names (`pytorch_model-0000k-of-0000n.bin`). No tensor data is read.

    Args:
        folder (`Path`): the model folder.
        step (`int`): its step (0: the base model).

    Returns:
        `WeightSource`: the tensors, in file order, with the identities of the files read.

    Raises:
        `DataError`: a missing shard, a malformed archive or index, a pickle that needs more than tensors, or no
            tensors.
    """
    single, index_path = folder / BIN_FILE, folder / BIN_INDEX_FILE
    for path in (single, index_path):
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path}: a broken link or a link loop; fix or remove it")
        if path.exists() and not path.is_file():
            raise DataError(f"{path}: not a regular file; replace it with the saved weights")
    identities: dict[Path, FileIdentity] = {}
    if single.is_file():
        tensors, tied = read_state_dict(single, identities)
        where = single
    else:
        tensors, tied = _read_sharded(index_path, identities)
        where = index_path
    if not tensors:
        raise DataError(f"{where}: holds no tensors; the checkpoint is empty or was not saved completely")
    tensors = dict(sorted(tensors.items(), key=lambda item: (str(item[1].path), item[1].start)))
    return WeightSource(step, folder, tensors, identities, layout="pytorch .bin", notes=tied_note(tied))


def _read_sharded(index_path: Path, identities: dict[Path, FileIdentity]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    index = read_json_file(index_path, what="index", hint="re-save the checkpoint")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DataError(f"{index_path}: malformed index (no weight_map of tensor names to files); re-save the checkpoint")
    shards: dict[str, dict[str, TensorInfo]] = {}
    tied: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise DataError(f"{index_path}: names shard {shard!r}, which is not a file name in its folder; the index is corrupt")
        path = index_path.parent / shard
        if not _is_file(path):
            raise DataError(f"{index_path}: names shard {shard!r}, which is missing; the checkpoint is incomplete")
        shards[shard], shard_tied = read_state_dict(path, identities)
        tied |= shard_tied
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        if name in tied:
            continue
        if name not in shards[shard]:
            raise DataError(f"{index_path}: tensor {name!r} is mapped to {shard}, which does not contain it")
        tensors[name] = shards[shard][name]
    for shard, shard_tensors in shards.items():
        for name in shard_tensors:
            if name not in weight_map:
                raise DataError(f"{index_path.parent / shard}: tensor {name!r} is not in the index {index_path.name}")
    return tensors, tied


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False also for names the system refuses (too long, NUL bytes, unencodable)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
