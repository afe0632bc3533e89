"""Write Hugging Face model folders: safetensors shards written in place, the index, and the sidecar files.

Every tensor's place is known from the headers before any data is computed, so each shard is created at its
final size with its header, and slices are written at their offsets (`pwrite`) as soon as the engine emits
them. Nothing is buffered beyond the slice in hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import Sink, Slice
from .errors import DataError, UsageError
from .safetensors_io import DTYPES, OpenFiles, writable_view

INDEX_FILE = "model.safetensors.index.json"
WRITEBACK_BYTES = 64 * 2**20
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int, *, option: str = "size") -> int:
    """Bytes from `5GB` (decimal, as huggingface_hub counts), `512MiB` (binary), or a plain integer."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text)
    if not match:
        raise UsageError(f"{option} {text!r}: not a size; write e.g. 5GB, 512MiB or 1000000")
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = _UNITS[unit[:1] if unit[:1] in "KMGT" else ""]
    if "I" in unit:
        scale = 1024 ** ("KMGT".index(unit[0]) + 1)
    return int(number * scale)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class _Placement:
    path: Path
    data_start: int  # absolute offset of the tensor's first byte
    itemsize: int


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


def shard_names(count: int) -> list[str]:
    """File names of a folder's shards, as `save_pretrained` names them."""
    return ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _shard_header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the safetensors library does
    return len(raw).to_bytes(8, "little") + raw


class ModelFolderWriter:
    """Creates a folder's safetensors shards at their final size; `write` fills them slice by slice.

    With `shards`, only the shards so named are created and written (a rank's share of a distributed run); the
    index still covers them all.
    """

    def __init__(
        self,
        folder: Path,
        tensors: Sequence[TensorSpec],
        *,
        max_shard_size: int,
        files: OpenFiles,
        shards: Collection[str] | None = None,
    ) -> None:
        self.folder = folder
        self.files = files
        self.unflushed = 0  # bytes written since the last start_writeback
        layout = shard_tensors(tensors, max_shard_size)
        self.shard_names = shard_names(len(layout))
        self.owned = [name for name in self.shard_names if shards is None or name in shards]
        self.placements: dict[str, _Placement] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(spec.nbytes for spec in tensors)
        folder.mkdir(parents=True, exist_ok=True)
        for shard_name, specs in zip(self.shard_names, layout):
            path = folder / shard_name
            header = _shard_header(specs)
            if shard_name in self.owned:
                with open(path, "wb") as f:
                    f.write(header)
                    f.truncate(len(header) + sum(spec.nbytes for spec in specs))
            offset = len(header)
            for spec in specs:
                self.placements[spec.name] = _Placement(path, offset, DTYPES[spec.dtype].itemsize)
                self.weight_map[spec.name] = shard_name
                offset += spec.nbytes

    def write(self, name: str, start: int, tensor: torch.Tensor) -> None:
        place = self.placements[name]
        tensor = tensor.contiguous()
        self.files.write_at(place.path, place.data_start + start * place.itemsize, writable_view(tensor))
        self.unflushed += tensor.nbytes
        if self.unflushed >= WRITEBACK_BYTES:  # keep the disk busy during the run, not only at the final fsync
            self.files.start_writeback(place.path)
            self.unflushed = 0

    def finish(self, *, index: bool = True) -> None:
        """Write the index of a sharded folder (unless `index` is False) and flush this writer's shards to disk."""
        if index and len(self.shard_names) > 1:
            index_data = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
        for shard_name in self.owned:
            fsync_path(self.folder / shard_name)


class FolderSink(Sink):
    """Sends each output's slices to its `ModelFolderWriter`."""

    def __init__(self, writers: Sequence[ModelFolderWriter]) -> None:
        self.writers = writers

    def write(self, output_index: int, piece: Slice, tensor: torch.Tensor) -> None:
        self.writers[output_index].write(piece.name, piece.start, tensor)


def copy_sidecar_files(sources: Sequence[Path], folder: Path, *, dtype: str | None = None) -> list[str]:
    """Copy config, generation config and tokenizer files from the first source folder that has each.

    When the output dtype differs from the inputs', `config.json` says so (`torch_dtype` and `dtype`).
    Returns the names copied.
    """
    copied = []
    for name in SIDECAR_FILES:
        origin = next((source / name for source in sources if (source / name).is_file()), None)
        if origin is None:
            continue
        shutil.copyfile(origin, folder / name)
        copied.append(name)
    if dtype is not None and "config.json" in copied:
        config_path = folder / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except ValueError as e:
            raise DataError(f"{config_path}: malformed JSON ({e})") from e
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return copied


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
