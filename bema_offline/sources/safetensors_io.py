"""The safetensors reader: a model folder's `model.safetensors`, or its shards and index, headers only.

Format: 8 bytes little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}, ...}` (plus an
optional `__metadata__` of strings), then the data; offsets are relative to the end of the header. Every header is
validated as strictly as the safetensors library itself does, and a little more (tensor names must be valid
UTF-8, shapes must have a size that a loader can hold), so that a file this tool accepts is one that loads.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from pathlib import Path

from ..dtypes import DTYPES
from ..errors import DataError
from ..files import FileIdentity, parse_json, read_json_file
from .tensors import Extent, TensorInfo, WeightSource

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
MAX_BYTES = 2**63 - 1  # the largest size a loader (torch, the safetensors library) can address


def read_header(path: Path, identities: dict[Path, FileIdentity] | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a safetensors file.

    Args:
        path (`Path`): the file.
        identities (`dict`, *optional*): receives the file's identity as it was when the header was read.

    Returns:
        `(tensors, metadata)`: the tensors by name, in file order, and the `__metadata__` strings.

    Raises:
        `DataError`: the file is truncated, its header is malformed or inconsistent with its size.
    """
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:  # (a FIFO must not block)
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise DataError(f"{path}: not a regular file; replace it with the saved weights")
            size = status.st_size
            if identities is not None:
                identities[path] = FileIdentity.of(status)
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
    entries, metadata = _parsed(raw, path)
    data_start = 8 + header_len
    if entries and data_start + entries[-1][3] + entries[-1][4] > size:
        name, _, _, start, nbytes = entries[-1]
        raise DataError(
            f"{path}: tensor {name!r} ends at byte {data_start + start + nbytes} but the file has {size} bytes; the file is truncated"
        )
    tensors = {
        name: TensorInfo(name, dtype, shape, (Extent(path, data_start + start, 0, math.prod(shape)),))
        for name, dtype, shape, start, _ in entries
    }
    return tensors, dict(metadata)


_PARSED: dict[bytes, tuple[list, dict]] = {}  # the headers parsed last (a run's checkpoints share one header)
_PARSED_KEPT = 4


def _parsed(raw: bytes, path: Path) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], dict[str, str]]:
    """A header's tensors, validated, as (name, dtype, shape, start, nbytes) in file order (offsets relative to the end
    of the header), and its metadata. The checkpoints of a run share one header: it is parsed and validated once."""
    if raw in _PARSED:
        return _PARSED[raw]
    header = parse_json(raw, what=f"{path}: malformed safetensors header", hint="the file is corrupt")
    if not isinstance(header, dict):
        raise DataError(f"{path}: malformed safetensors header (not a JSON object); the file is corrupt")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise DataError(f"{path}: malformed safetensors __metadata__ (not a JSON object); the file is corrupt")
    entries = [_entry(path, name, entry) for name, entry in header.items()]
    entries.sort(key=lambda e: (e[3], e[4]))
    previous = None
    for entry in entries:
        if previous is not None and entry[3] < previous[3] + previous[4]:
            raise DataError(f"{path}: tensors {previous[0]!r} and {entry[0]!r} overlap; the file is corrupt")
        previous = entry
    parsed = entries, {str(k): str(v) for k, v in metadata.items()}
    if len(_PARSED) >= _PARSED_KEPT:
        _PARSED.pop(next(iter(_PARSED)))
    _PARSED[raw] = parsed
    return parsed


def check_tensor_name(name: str, where: str) -> None:
    """A tensor name every loader can read back: valid UTF-8 (JSON lets a lone surrogate through)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: tensor name {name!r} is not valid UTF-8 (a lone surrogate); the file is corrupt") from None


def check_shape(shape: object, itemsize: int, where: str) -> tuple[int, ...]:
    """A shape of non-negative ints whose byte size a loader can hold (a zero dimension does not excuse a huge one)."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise DataError(f"{where}: malformed shape {shape!r}; the file is corrupt")
    if math.prod(d for d in shape if d) * itemsize > MAX_BYTES:
        raise DataError(f"{where}: shape {shape} is too large for any loader (over 2^63 bytes); the file is corrupt")
    return tuple(shape)


def tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry, validated, as a `TensorInfo` (for headers read another way, e.g. over HTTP)."""
    name, dtype, shape, start, _ = _entry(path, name, entry)
    return TensorInfo.contiguous(name, path, dtype, shape, data_start + start)


def _entry(path: Path, name: str, entry: object) -> tuple[str, str, tuple[int, ...], int, int]:
    where = f"{path}: tensor {name!r}"
    check_tensor_name(name, str(path))
    if not isinstance(entry, dict):
        raise DataError(f"{where}: malformed header entry; the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DataError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    shape = check_shape(shape, DTYPES[dtype].itemsize, where)
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
            f"{where}: shape {list(shape)} of {dtype} needs {expected} bytes but data_offsets span {nbytes}; the file is corrupt"
        )
    return name, dtype, shape, offsets[0], nbytes


def load_safetensors(folder: Path, step: int) -> WeightSource:
    """Read the safetensors headers of one model folder: `model.safetensors`, else the shards its index names.

    Where a folder holds both, `model.safetensors` is read, as transformers' `from_pretrained` does; a note says that
    the shards were ignored.

    Raises:
        `DataError`: a missing shard, a corrupt header or index, or no tensors.
    """
    index_path = folder / INDEX_FILE
    single = folder / SINGLE_FILE
    for path in (index_path, single):
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path}: a broken link or a link loop; fix or remove it")
        if path.exists() and not path.is_file():
            raise DataError(f"{path}: not a regular file; replace it with the saved weights")
    identities: dict[Path, FileIdentity] = {}
    notes: tuple[str, ...] = ()
    if single.is_file():
        tensors, _ = read_header(single, identities)
        where = single
        if index_path.is_file():
            notes = (f"{folder} holds both {SINGLE_FILE} and {INDEX_FILE}: read {SINGLE_FILE}, as transformers loads it; the shards were ignored",)
    else:
        tensors = _read_sharded(index_path, identities)
        where = index_path
    if not tensors:
        raise DataError(f"{where}: holds no tensors; the checkpoint is empty or was not saved completely")
    return WeightSource(step, folder, tensors, identities, layout="safetensors", notes=notes)


def _read_sharded(index_path: Path, identities: dict[Path, FileIdentity]) -> dict[str, TensorInfo]:
    index = read_json_file(index_path, what="index", hint="re-save the checkpoint")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DataError(f"{index_path}: malformed index (no weight_map of tensor names to files); re-save the checkpoint")
    headers: dict[str, dict[str, TensorInfo]] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise DataError(f"{index_path}: names shard {shard!r}, which is not a file name in its folder; the index is corrupt")
        if not _is_file(shard_path):
            raise DataError(f"{index_path}: names shard {shard!r}, which is missing; the checkpoint is incomplete")
        headers[shard], _ = read_header(shard_path, identities)
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise DataError(f"{index_path}: tensor {name!r} is mapped to {shard}, which does not contain it")
        tensors[name] = headers[shard][name]
    for shard, header in headers.items():
        for name in header:
            if name not in weight_map:
                raise DataError(f"{index_path.parent / shard}: tensor {name!r} is not in the index {index_path.name}")
    return dict(sorted(tensors.items(), key=lambda item: (str(item[1].path), item[1].start)))


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False also for names the system refuses (too long, NUL bytes, unencodable)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
