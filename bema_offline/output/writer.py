"""Write Hugging Face model folders: safetensors shards written in place, the index, and the sidecar files.

Every tensor's place is known from the headers before any data is computed, so each shard is created at its
final size with its header, and slices are written at their offsets (`pwrite`) as soon as the engine emits
them. Nothing is buffered beyond the slice in hand.

Each shard's sha256 is computed while it is written (`ShardDigest`), for the provenance record: `verify` then
catches a single flipped bit without recomputing anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..dtypes import DTYPES
from ..engine.engine import Sink, Slice
from ..errors import DataError, UsageError
from ..faults import fault_point
from ..files import OpenFiles, create_new_file, parse_json, preallocate, read_small_file, replace_file
from ..sources.safetensors_io import SINGLE_FILE

INDEX_FILE = "model.safetensors.index.json"
WRITEBACK_BYTES = 64 * 2**20
READ_BACK_BYTES = 256 * 2**10  # chunk in which bytes written ahead of a shard's hash are read back (fits L2)
_read_back_buffers = threading.local()  # one reusable chunk buffer per thread
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I)?)?(B)?\s*", re.IGNORECASE)


def parse_size(text: str | int, *, option: str = "size", minimum: int = 1, unit_required: bool = False) -> int:
    """Bytes from `5GB` (decimal, as huggingface_hub counts), `512MiB` (binary), `8000B`, or a plain integer.

    Args:
        text (`str | int`): the size as written, or bytes.
        option (`str`): the option's name, for messages.
        minimum (`int`, defaults to 1): the smallest size allowed.
        unit_required (`bool`, defaults to False): refuse a number without a unit (for `--max-memory`, where `512`
            alone is a slip for 512MiB, not 512 bytes).

    Raises:
        `UsageError`: not a size, no unit where one is required, or below `minimum`.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise UsageError(f"{option} {text!r}: not a size; write e.g. 5GB, 512MiB or 1000000")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text)
        if not match or not match.group(1)[0].isdigit():
            raise UsageError(f"{option} {text!r}: not a size; write e.g. 5GB, 512MiB or 1000000")
        number, prefix, binary, byte = match.groups()
        if unit_required and not (prefix or byte):
            raise UsageError(f"{option} {text}: give a unit, e.g. {text}MiB (or {text}B for bytes)")
        power = "KMGT".index(prefix.upper()) + 1 if prefix else 0
        value = int(float(number) * (1024**power if binary else 1000**power))
    if value < minimum:
        raise UsageError(f"{option} {text}: at least {minimum} bytes are needed; write e.g. 512MiB")
    return value


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @cached_property
    def nbytes(self) -> int:  # (asked for several times per tensor: a model may have tens of thousands)
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class _Placement:
    path: Path
    data_start: int  # absolute offset of the tensor's first byte
    itemsize: int
    digest: ShardDigest | None  # None: a shard this writer does not write


def shard_tensors(tensors: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in tensors:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _shard_header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the safetensors library does
    return len(raw).to_bytes(8, "little") + raw


@dataclass(frozen=True)
class ShardLayout:
    """One output shard: its file name, its tensors in order, and its header bytes."""

    name: str
    tensors: list[TensorSpec]
    header: bytes

    @cached_property
    def file_size(self) -> int:
        return len(self.header) + sum(spec.nbytes for spec in self.tensors)


def shard_layout(tensors: Sequence[TensorSpec], max_shard_size: int, *, single_file: str = SINGLE_FILE) -> list[ShardLayout]:
    """The shards a folder of these tensors is written as, named as `save_pretrained` names them (`single_file`
    when there is one: another name for another kind of folder, e.g. a PEFT adapter's)."""
    shards = shard_tensors(tensors, max_shard_size)
    count = len(shards)
    names = [single_file] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    return [ShardLayout(name, specs, _shard_header(specs)) for name, specs in zip(names, shards)]


class ShardDigest:
    """The sha256 of one shard, computed in file order while any number of threads write it at any offsets.

    The header is hashed when the shard is created. A write that lands at the hash cursor (the first byte not yet
    hashed) is hashed from the writer's own buffer. A write ahead of the cursor is only noted; once the cursor reaches
    it, its bytes are read back from the file, from the page cache that the write has just filled, and hashed. One
    thread hashes a shard at a time: a write that arrives meanwhile is noted as well and hashed by that thread, so no
    writer waits for another's hashing. The engine emits slices mostly in file order, so most bytes are hashed from
    the buffer they were written from, and the shard is never read from the disk.

    Args:
        path (`Path`): the shard, for reading back.
        header (`bytes`): the header bytes, already written.
        size (`int`): the shard's final size in bytes.

    Example:

    ```python
    >>> fd = os.open(path, os.O_RDWR | os.O_CREAT); os.pwrite(fd, b"HEAD", 0)     # a 10-byte shard's header
    >>> digest = ShardDigest(path, b"HEAD", 10)
    >>> os.pwrite(fd, b"789", 7); digest.wrote(7, memoryview(b"789"))       # ahead of the cursor: noted
    >>> os.pwrite(fd, b"456", 4); digest.wrote(4, memoryview(b"456"))       # at it: hashed, then 7-9 read back
    >>> digest.sha256 == hashlib.sha256(b"HEAD456789").hexdigest()
    True
    ```
    """

    def __init__(self, path: Path, header: bytes, size: int) -> None:
        self.path = path
        self.size = size
        self.read_back = 0  # bytes read back from the file to be hashed (for tests and benchmarks)
        self._sha = hashlib.sha256(header)
        self._cursor = len(header)
        self._ahead: dict[int, int] = {}  # start -> stop of each write not yet hashed
        self._busy = False  # a thread is hashing (it then owns `_sha` and moves `_cursor`)
        self._lock = threading.Lock()

    def wrote(self, offset: int, data: memoryview) -> None:
        """Account for `data`, just written at byte `offset` (each byte of the shard is written once)."""
        with self._lock:
            if self._busy or offset != self._cursor:
                self._ahead[offset] = offset + data.nbytes
                return
            self._busy = True
        try:
            self._sha.update(data)
            self._catch_up(offset + data.nbytes)
        except BaseException:
            with self._lock:
                self._busy = False
                self._cursor = -1  # the digest can no longer be completed; `sha256` stays None
            raise

    def _catch_up(self, position: int) -> None:
        """Hash the noted writes that follow `position` without a gap, reading them back, until none does."""
        while True:
            with self._lock:
                self._cursor = position
                stop = self._ahead.pop(position, None)
                if stop is None:
                    self._busy = False
                    return
                while (following := self._ahead.pop(stop, None)) is not None:
                    stop = following
            self._hash_file_range(position, stop)
            position = stop

    def _hash_file_range(self, start: int, stop: int) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read the shard back to hash it ({e.strerror or e})") from e
        try:
            buffer = getattr(_read_back_buffers, "buffer", None)
            if buffer is None:
                buffer = _read_back_buffers.buffer = memoryview(bytearray(READ_BACK_BYTES))
            while start < stop:
                try:
                    count = os.preadv(fd, [buffer[: min(stop - start, len(buffer))]], start)
                except OSError as e:
                    raise DataError(f"{self.path}: read error at byte {start} while hashing the shard ({e.strerror or e})") from e
                if count == 0:
                    raise DataError(f"{self.path}: the shard ended at byte {start} while being hashed; something truncated it")
                self._sha.update(buffer[:count])
                self.read_back += count
                start += count
        finally:
            os.close(fd)

    @property
    def sha256(self) -> str | None:
        """The hex digest once every byte is hashed, else None."""
        with self._lock:
            if self._busy or self._cursor != self.size:
                return None
            return self._sha.hexdigest()


def _create_shard(path: Path, shard: ShardLayout) -> None:
    """Create a shard at its final size with its header; a leftover of an interrupted run at `path` is unlinked, never
    written through (see `files.create_new_file`)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = create_new_file(path)
    try:
        os.pwrite(fd, shard.header, 0)
        os.ftruncate(fd, shard.file_size)
        preallocate(fd, shard.file_size)
    finally:
        os.close(fd)


class ModelFolderWriter:
    """Creates a folder's safetensors shards at their final size; `write` fills them slice by slice.

    The writer counts the bytes written to each shard. When a shard is full it is flushed to disk and
    `on_shard_done(path)` is called (the run records it, so that `--resume` can reuse it). Shards named in
    `keep_shards` are already complete from an interrupted run: they are left as they are and not written. With
    `shards`, only the shards so named are created and written (a rank's share of a distributed run); the index
    still covers them all. A folder of one shard names it `single_file`. Every shard it writes, and the index, is
    hashed as it is written (`digests`).
    """

    def __init__(
        self,
        folder: Path,
        tensors: Sequence[TensorSpec],
        *,
        max_shard_size: int,
        files: OpenFiles,
        keep_shards: Collection[str] = (),
        on_shard_done: Callable[[Path], None] | None = None,
        shards: Collection[str] | None = None,
        flusher: ShardFlusher | None = None,
        single_file: str = SINGLE_FILE,
    ) -> None:
        self.folder = folder
        self.files = files
        self.on_shard_done = on_shard_done
        self.flusher = flusher
        self._lock = threading.Lock()  # the byte counts below, updated by concurrent writes
        self.unflushed = 0  # bytes written since the last start_writeback
        layout = shard_layout(tensors, max_shard_size, single_file=single_file)
        self.shard_names = [shard.name for shard in layout]
        skip = set(keep_shards) | (set() if shards is None else set(self.shard_names) - set(shards))
        self.placements: dict[str, _Placement] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(spec.nbytes for spec in tensors)
        self.unwritten: dict[Path, int] = {}  # bytes still to write, per shard being written
        self.shard_digests: dict[str, ShardDigest] = {}  # of the shards this writer writes, by name
        self.index_sha256: str | None = None
        folder.mkdir(parents=True, exist_ok=True)
        for shard in layout:
            path = folder / shard.name
            digest = None
            if shard.name not in skip:
                try:
                    _create_shard(path, shard)
                except OSError as e:
                    raise DataError(f"{path}: cannot create the shard ({e.strerror or e}); free some disk space or choose another --output") from e
                fault_point("shard-created")
                file_size = shard.file_size
                self.unwritten[path] = file_size - len(shard.header)
                digest = self.shard_digests[shard.name] = ShardDigest(path, shard.header, file_size)
            offset = len(shard.header)
            for spec in shard.tensors:
                self.placements[spec.name] = _Placement(path, offset, DTYPES[spec.dtype].itemsize, digest)
                self.weight_map[spec.name] = shard.name
                offset += spec.nbytes
        for path, size in list(self.unwritten.items()):
            if size == 0:  # a shard of empty tensors is complete as created
                del self.unwritten[path]
                self._shard_done(path)

    def write(self, name: str, start: int, data: memoryview) -> None:
        """Write the bytes of a slice of tensor `name` (its elements from `start` on) in place. Threads may call
        this at once for different slices; `files` must then never close a file by itself (`max_open=None`)."""
        place = self.placements[name]
        nbytes = data.nbytes
        if nbytes == 0:
            return
        if place.path not in self.unwritten:
            raise DataError(f"{place.path}: tensor {name!r} written to a shard that is already complete; report this bug")
        offset = place.data_start + start * place.itemsize
        self.files.write_at(place.path, offset, data)
        place.digest.wrote(offset, data)
        with self._lock:  # counted after the write: the shard is complete only once every write has returned
            self.unwritten[place.path] -= nbytes
            done = self.unwritten[place.path] == 0
            if done:
                del self.unwritten[place.path]
            else:
                self.unflushed += nbytes
                writeback = self.unflushed >= WRITEBACK_BYTES
                if writeback:
                    self.unflushed = 0
        if done:
            self.files.close_file(place.path)
            self._shard_done(place.path)
        elif writeback:  # keep the disk busy during the run, not only at the final fsync
            self.files.start_writeback(place.path)

    def _shard_done(self, path: Path) -> None:
        if self.flusher is not None:
            self.flusher.submit(path, self._flushed)
        else:
            fsync_path(path)
            self._flushed(path)

    def _flushed(self, path: Path) -> None:
        if self.on_shard_done is not None:
            self.on_shard_done(path)
            fault_point("shard-done")

    def finish(self, *, index: bool = True) -> None:
        """Check that every shard was written completely, and write the index of a sharded folder (unless `index`
        is False: in a distributed run rank 0 writes it)."""
        if self.unwritten:
            path, missing = next(iter(self.unwritten.items()))
            raise DataError(f"{path}: {missing} bytes were never written; the output is incomplete and was not published")
        if index and len(self.shard_names) > 1:
            index_data = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            raw = (json.dumps(index_data, indent=2) + "\n").encode()
            replace_file(self.folder / INDEX_FILE, raw)
            self.index_sha256 = hashlib.sha256(raw).hexdigest()
        fault_point("index")

    def digests(self) -> dict[str, str]:
        """The sha256 of every file this writer wrote (its shards and the index), by file name, hashed as written.
        Shards it did not write (reused by `--resume`, or another rank's) are not in it. Call after `finish`."""
        digests = {}
        for name, digest in self.shard_digests.items():
            if digest.sha256 is None:
                raise DataError(f"{digest.path}: the shard's sha256 was not completed while writing it; report this bug")
            digests[name] = digest.sha256
        if self.index_sha256 is not None:
            digests[INDEX_FILE] = self.index_sha256
        return digests


class ShardFlusher:
    """Flushes finished shards to disk on a background thread, in the order they finish, so that no engine worker
    waits for the disk: each shard is fsynced, then `then(path)` runs (the run records the shard for `--resume`).

    Leaving the context waits for every flush, and raises the first error (a failed fsync, say) unless the block
    itself raised.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bema-flusher", daemon=True)
        self._thread.start()

    def submit(self, path: Path, then: Callable[[Path], None]) -> None:
        self._queue.put((path, then))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            path, then = item
            if self._error is not None:
                continue
            try:
                fsync_path(path)
                then(path)
            except BaseException as e:  # re-raised in the thread that waits
                self._error = e

    def wait(self) -> None:
        """Wait until every shard submitted is flushed; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> ShardFlusher:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.wait()
        else:  # stop, without masking the error in flight
            self._queue.put(None)
            self._thread.join()


class FolderSink(Sink):
    """Sends each output's slices to its `ModelFolderWriter`, from several threads at once."""

    concurrent = True

    def __init__(self, writers: Sequence[ModelFolderWriter]) -> None:
        self.writers = writers

    def write(self, output_index: int, piece: Slice, data: memoryview) -> None:
        self.writers[output_index].write(piece.name, piece.start, data)


def copy_sidecar_files(
    origins: Mapping[str, Path], folder: Path, *, dtype: str | None = None, untie_embeddings: bool = False
) -> list[str]:
    """Copy the config, generation config and tokenizer files planned for an output (`Plan.sidecars`).

    A file that disappeared since the plan was made is refused (the folder would not load). When the output dtype
    differs from the inputs', `config.json` says so (`torch_dtype` and `dtype`). With `untie_embeddings` (the
    output holds an `lm_head.weight` of its own where the inputs tied it to the input embedding, e.g. a LoRA run
    that changed one of them), it says `"tie_word_embeddings": false`, else the loader would tie them again.
    Returns the names copied.
    """
    for name, origin in origins.items():
        if not origin.is_file():
            raise DataError(f"{origin}: disappeared during the run, so the output would lack {name}; rerun once the inputs are complete")
        data = read_small_file(origin, what=name)
        if name == "config.json" and (dtype is not None or untie_embeddings):
            hint = "fix it, or leave out --dtype" if dtype is not None else "fix it"
            config = parse_json(data, what=f"{origin}: malformed JSON", hint=hint)
            if not isinstance(config, dict):
                raise DataError(f"{origin}: not a JSON object; {hint}")
            for key in ("torch_dtype", "dtype"):
                if key in config and dtype is not None:
                    config[key] = dtype
            if untie_embeddings:
                config["tie_word_embeddings"] = False
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        replace_file(folder / name, data)
    return list(origins)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
