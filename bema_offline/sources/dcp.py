"""The FSDP sharded-checkpoint reader: `pytorch_model_fsdp_0/`, a `torch.distributed.checkpoint` (DCP) folder.

With `SHARDED_STATE_DICT`, accelerate (and so the Trainer) saves `{"model": state_dict}` with DCP's
`FileSystemWriter`: each rank writes its chunks (dim-0 shards of every tensor) into `__<rank>_<n>.distcp` files, one
`torch.save` zip archive per chunk, back to back; `.metadata` pickles DCP's `Metadata`: each tensor's dtype, size and
chunks (offsets and sizes), where each chunk lies (file, byte offset, length), and the path each flattened key had
in the saved dict (`("model", "model.layers.0.mlp.up_proj.weight")`), which gives the model's own tensor names.

`.metadata` is read with the same code-free unpickler as `.bin` files (DCP's classes become `Opaque` records, which
are read by field name), and each chunk's archive with the `.bin` parser; a chunk becomes the extents of the elements
it holds. The checkpoint holds no `config.json` or tokenizer: those come from the other sources of the run.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path

from ..dtypes import DTYPES
from ..errors import DataError
from ..files import FileIdentity
from .tensors import Extent, TensorInfo, WeightSource
from .torch_bin import MAX_RUNS, Opaque, Region, StoredTensor, TorchArchive, _Marker, open_file, shown_value, unpickle

DCP_FOLDER = "pytorch_model_fsdp_0"
METADATA_FILE = ".metadata"
METADATA_LIMIT = 256 * 2**20


def load_dcp(folder: Path, step: int) -> WeightSource:
    """Read the tensor records of an FSDP sharded checkpoint: `folder/pytorch_model_fsdp_0/` (`.metadata` and the
    `.distcp` files it names). No tensor data is read.

    Args:
        folder (`Path`): the checkpoint folder (`checkpoint-N`).
        step (`int`): its step.

    Returns:
        `WeightSource`: the model's tensors, each with the extents of its chunks.

    Raises:
        `DataError`: missing or malformed metadata, a missing `.distcp` file, chunks that do not cover a tensor, or a
            chunk that is not a `torch.save` archive of the tensor's dtype and chunk shape.
    """
    dcp_dir = folder / DCP_FOLDER
    metadata_path = dcp_dir / METADATA_FILE
    if not metadata_path.is_file():
        raise DataError(
            f"{dcp_dir}: no {METADATA_FILE} (rank 0 writes it last, once every rank's chunks are saved), so the FSDP "
            "checkpoint is incomplete; use another checkpoint, or --max-step to stop before this one"
        )
    identities: dict[Path, FileIdentity] = {}
    with open_file(metadata_path, identities) as region:
        if region.size > METADATA_LIMIT:
            raise DataError(f"{metadata_path}: {region.size} bytes, more than any checkpoint's metadata ({METADATA_LIMIT}); the file is corrupt")
        raw = region.read(0, region.size)
    metadata, _ = unpickle(raw, str(metadata_path), opaque=True)
    tensors_meta, storage, names = _parse_metadata(metadata, metadata_path)
    tensors: dict[str, TensorInfo] = {}
    with contextlib.ExitStack() as stack:
        regions: dict[str, Region] = {}

        def region_of(relative_path: str) -> Region:
            if relative_path not in regions:
                path = dcp_dir / relative_path
                if Path(relative_path).name != relative_path or relative_path in ("", ".", ".."):
                    raise DataError(f"{metadata_path}: names data file {relative_path!r}, which is not a file name in its folder; the metadata is corrupt")
                if not path.is_file():
                    raise DataError(f"{metadata_path}: names {relative_path}, which is missing; the checkpoint is incomplete (was every rank's file copied?)")
                regions[relative_path] = stack.enter_context(open_file(path, identities))
            return regions[relative_path]

        for key, (dtype, size, chunks) in tensors_meta.items():
            name = names[key]
            extents = []
            for offsets, sizes in chunks:
                where = storage.get((key, offsets))
                if where is None:
                    raise DataError(f"{metadata_path}: chunk at {list(offsets)} of {key!r} has no storage record; the metadata is corrupt")
                relative_path, start, length = where
                extents += _chunk_extents(region_of(relative_path), start, length, key, dtype, size, offsets, sizes)
            cover = _cover(extents, math.prod(size), DTYPES[dtype].itemsize, f"{metadata_path}: tensor {key!r}")
            tensors[name] = TensorInfo(name, dtype, size, cover or (Extent(metadata_path, 0, 0, 0),))
    if not tensors:
        raise DataError(f"{metadata_path}: holds no tensors; the checkpoint is empty or was not saved completely")
    notes = (f"read the FSDP sharded checkpoint {DCP_FOLDER}/ ({len(regions)} data files)",)
    return WeightSource(step, folder, tensors, identities, layout="fsdp sharded (dcp)", notes=notes)


def _parse_metadata(metadata: object, path: Path):
    """The tensors of DCP's `Metadata` (key -> dtype, size, chunks), where each chunk lies ((key, offsets) -> file,
    offset, length), and each key's model name."""

    def fields(value: object, kind: str) -> dict:
        if not (isinstance(value, Opaque) and value.qualname.rsplit(".", 1)[-1] == kind):
            raise DataError(f"{path}: expected DCP's {kind}, found {shown_value(value)}; this is not a torch.distributed.checkpoint folder, or the metadata is corrupt")
        return value.fields

    top = fields(metadata, "Metadata")
    described, stored, planner = top.get("state_dict_metadata"), top.get("storage_data"), top.get("planner_data") or {}
    if not isinstance(described, dict) or not isinstance(stored, dict) or not isinstance(planner, dict):
        raise DataError(f"{path}: malformed DCP metadata (no state_dict_metadata or storage_data); the checkpoint is corrupt")
    tensors = {}
    for key, entry in described.items():
        if isinstance(entry, Opaque) and entry.qualname.endswith("BytesStorageMetadata"):
            continue  # a non-tensor value of the state dict
        entry = fields(entry, "TensorStorageMetadata")
        dtype = _dtype(entry.get("properties"), key, path)
        size = _dims(entry.get("size"), key, path)
        chunks = [fields(chunk, "ChunkStorageMetadata") for chunk in entry.get("chunks") or []]
        chunks = [(_dims(chunk.get("offsets"), key, path), _dims(chunk.get("sizes"), key, path)) for chunk in chunks]
        if not isinstance(key, str):
            raise DataError(f"{path}: a tensor key is {shown_value(key)}, not a name; the metadata is corrupt")
        tensors[key] = (dtype, size, chunks)
    storage = {}
    for index, info in stored.items():
        index, info = fields(index, "MetadataIndex"), fields(info, "_StorageInfo")
        key, offsets = index.get("fqn"), _dims(index.get("offset"), index.get("fqn"), path)
        relative_path, start, length = info.get("relative_path"), info.get("offset"), info.get("length")
        if not (isinstance(relative_path, str) and _is_count(start) and _is_count(length)):
            raise DataError(f"{path}: malformed storage record for {key!r}; the metadata is corrupt")
        if info.get("transform_descriptors"):
            raise DataError(
                f"{path}: tensor {key!r} was saved through DCP extensions {info['transform_descriptors']!r} (e.g. compressed); "
                "only plain FileSystemWriter checkpoints are streamed: load it with torch.distributed.checkpoint and save_pretrained"
            )
        storage[(key, offsets)] = (relative_path, start, length)
    return tensors, storage, _model_names(list(tensors), planner, path)


def _model_names(keys: list[str], planner: dict, path: Path) -> dict[str, str]:
    """The model's name of each flattened DCP key: accelerate saves `{"model": state_dict}`, so the key
    `model.model.norm.weight` was the path `("model", "model.norm.weight")`."""
    paths = {key: planner.get(key) for key in keys}
    wrapped = all(isinstance(p, tuple) and len(p) == 2 and p[0] == "model" and isinstance(p[1], str) for p in paths.values())
    names = {key: paths[key][1] if wrapped else key for key in keys}
    if len(set(names.values())) < len(names):
        raise DataError(f"{path}: two keys map to the same tensor name; the metadata is corrupt")
    return names


def _chunk_extents(
    region: Region, start: int, length: int, key: str, dtype: str, size: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]
) -> list[Extent]:
    """The extents of one chunk: where its elements lie in the data file, numbered as elements of the whole tensor."""
    where = f"{region.path}: chunk at {list(offsets)} of {key!r}"
    if len(offsets) != len(size) or len(sizes) != len(size) or any(o + n > s for o, n, s in zip(offsets, sizes, size)):
        raise DataError(f"{where}: sizes {list(sizes)} do not fit the tensor's {list(size)}; the metadata is corrupt")
    if math.prod(sizes) == 0:
        return []
    if start + length > region.size:
        raise DataError(f"{where} runs past the end of the file (byte {start + length} of {region.size}); the file is truncated")
    archive = TorchArchive(Region(region.fd, region.path, start, length))
    if not isinstance(archive.root, StoredTensor):
        raise DataError(f"{where}: the item is not a tensor; the checkpoint is corrupt")
    local = archive.tensor_info(key, archive.root)
    if local.dtype != dtype or local.shape != sizes:
        raise DataError(f"{where}: the item is a {local.dtype} tensor of shape {list(local.shape)}, not {dtype} {list(sizes)}; the checkpoint is corrupt")
    runs = _box_runs(size, offsets, sizes)
    if runs is None:
        raise DataError(f"{where}: a chunk split along inner dimensions into more than {MAX_RUNS} pieces; load it with torch.distributed.checkpoint and save_pretrained")
    itemsize = DTYPES[dtype].itemsize
    extents, pieces = [], iter(local.extents)
    piece = next(pieces)
    for local_first, global_first, n in runs:  # cut the chunk's own extents at the boundaries of its runs
        while n:
            while piece.stop <= local_first:
                piece = next(pieces)
            take = min(n, piece.stop - local_first)
            offset = piece.offset + (local_first - piece.first) * itemsize
            extents.append(Extent(piece.path, offset, global_first, global_first + take))
            local_first, global_first, n = local_first + take, global_first + take, n - take
    return extents


def _box_runs(size: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[tuple[int, int, int]] | None:
    """The runs of a chunk in the whole tensor: `(first element in the chunk, first element in the tensor, length)`,
    in chunk order; None when there would be more than `MAX_RUNS`.

    A dim-0 shard (every inner dimension whole) is a single run; a chunk cut along an inner dimension is one run per
    index of the dimensions before the cut."""
    if not size:
        return [(0, 0, 1)]
    cut = len(size) - 1  # the last dimension the chunk does not span whole (or 0)
    while cut > 0 and sizes[cut] == size[cut]:
        cut -= 1
    strides = [math.prod(size[d + 1 :]) for d in range(len(size))]
    run = math.prod(sizes[cut:])
    outer = sizes[:cut]
    if math.prod(outer) > MAX_RUNS:
        return None
    start = offsets[cut] * strides[cut]
    return [
        (local * run, start + sum((offsets[d] + i) * strides[d] for d, i in enumerate(index)), run)
        for local, index in enumerate(itertools.product(*map(range, outer)))
    ]


def _cover(extents: list[Extent], numel: int, itemsize: int, where: str) -> tuple[Extent, ...]:
    """The extents in element order, checked to cover [0, numel) exactly once; pieces that continue each other in
    the same file are merged."""
    extents.sort(key=lambda e: e.first)
    merged: list[Extent] = []
    position = 0
    for extent in extents:
        if extent.first != position:
            what = "overlap" if extent.first < position else f"leave elements {position} to {extent.first} out"
            raise DataError(f"{where}: its chunks {what}; the checkpoint is incomplete or corrupt")
        last = merged[-1] if merged else None
        if last is not None and last.path == extent.path and last.offset + (last.stop - last.first) * itemsize == extent.offset:
            merged[-1] = Extent(last.path, last.offset, last.first, extent.stop)
        else:
            merged.append(extent)
        position = extent.stop
    if position != numel:
        raise DataError(f"{where}: its chunks hold {position} of its {numel} elements; the checkpoint is incomplete")
    return tuple(merged)


def _dtype(properties: object, key: str, path: Path) -> str:
    """A tensor's dtype from DCP's `TensorProperties` (pickled as a tuple whose first item is the dtype)."""
    state = properties.state if isinstance(properties, Opaque) else None
    dtype = state[0] if isinstance(state, tuple) and state else (state or {}).get("dtype") if isinstance(state, dict) else None
    if not (isinstance(dtype, _Marker) and dtype.kind == "dtype"):
        raise DataError(f"{path}: tensor {key!r} has no dtype this tool reads ({shown_value(dtype)}); the metadata is corrupt or the dtype is unsupported")
    return dtype.value


def _dims(value: object, key: object, path: Path) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and all(_is_count(v) for v in value)):
        raise DataError(f"{path}: malformed size or offset {shown_value(value)} for {shown_value(key)}; the metadata is corrupt")
    return value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62
