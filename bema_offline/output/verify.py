"""Check an output folder, from its files to its values, so that a wrong or half-written model never goes unseen.

Two depths share one implementation:

- `check_folder` (light, headers only; `average` runs it before it publishes): the weights are single-file or
  sharded with an index that agrees with the shards, no stray shard lies beside them, every shard holds exactly
  the bytes its header describes, and, when given, the tensors are the planned ones. `check_adapter_folder` is the
  same for a PEFT adapter folder (`--lora-output adapter`), and `check_output_folder` either, as the folder is.
- `verify` (the `bema-offline verify` command): the light check, then `config.json` against the tensor shapes,
  every value finite and every weight file's sha256 (one streamed read in bounded memory), `bema_offline.json`
  against the folder (names, sizes and sha256 of the weight files: a single flipped bit is caught), the tensors
  against the source checkpoints named there, and with `recompute=K`, K random tensors recomputed from those
  sources and compared bit for bit. The outputs of a LoRA run, whose sources are a base model and adapter
  checkpoints, are checked against them in `verify_lora`.

Every check is linear in the number of tensors and shards (up to a sort), so a folder of 20,000 tensors in
20,000 shards verifies as fast as its bytes allow.

Every problem raises a `DataError` whose one line names the folder, file or tensor.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ..dtypes import DTYPES, FLOAT_DTYPES
from ..engine import kernels
from ..engine.engine import Engine, Sink, Slice, all_finite
from ..engine.kernels import KERNEL_DTYPES, kernel_name
from ..engine.plan import LORA_AVERAGES, LORA_OUTPUTS, OutputSpec, Plan, ScheduleRun, untie_head
from ..errors import BemaError, DataError
from ..files import OpenFiles, read_json_file
from ..methods.schedule import KINDS, BEMASchedule, effective_weights
from ..sources.peft import ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, is_adapter_folder, load_adapter_checkpoint
from ..sources.run import BASE_STEP, INDEX_FILE, SINGLE_FILE, WeightSource, load_source
from ..sources.tensors import TensorInfo
from .card import PROVENANCE_FILE, PROVENANCE_LIMIT, record_method

DEFAULT_CHUNK_BYTES = 64 * 2**20
READ_BYTES = 8 * 2**20  # the largest read of check_values, whatever --max-memory allows
# Tensors whose first dimension is the vocabulary and second the hidden size, in common architectures.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "embed_out.weight", "lm_head.weight")
_LAYER_INDEX = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.|model\.decoder\.)?(?:layers|h)\.(\d+)\.")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Config keys that mean the embedding's rows or columns are not simply vocab_size x hidden size (OLMo's padded
# `embedding_size`, ALBERT's factorized `embedding_size`, OPT's `word_embed_proj_dim`, ChatGLM's padding).
_EMBEDDING_EXCEPTIONS = ("embedding_size", "word_embed_proj_dim", "padded_vocab_size")


@dataclasses.dataclass
class FolderReport:
    """What `verify` found in one model folder."""

    folder: Path
    tensors: int
    shards: int
    has_provenance: bool
    adapter: bool = False  # a PEFT adapter folder (`--lora-output adapter`), not a model folder
    sources_checked: list[int] = dataclasses.field(default_factory=list)
    recomputed: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


# --- light: the files agree with each other ------------------------------------------------------------------


def check_folder(folder: Path, *, expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None) -> dict[str, TensorInfo]:
    """The light check: index, shards and headers agree, and every shard is exactly as long as its header says.

    Args:
        folder (`Path`): a model folder.
        expected (`Mapping[str, tuple[str, tuple[int, ...]]]`, *optional*): the planned tensors, name to
            (safetensors dtype, shape); when given, the folder must hold exactly these.

    Returns:
        `dict[str, TensorInfo]`: the folder's tensors by name.
    """
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.exists() and index.exists():
        raise DataError(f"{folder}: holds both {SINGLE_FILE} and {INDEX_FILE}; loaders would ignore the shards")
    tensors = load_source(folder, BASE_STEP).tensors
    shards = by_shard(tensors)
    shard_files = {path.name for path in shards}
    stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in shard_files)
    if stray:
        raise DataError(f"{folder / stray[0]}: a safetensors file that the index does not name; remove it or re-save")
    if index.exists():
        total = sum(info.nbytes for info in tensors.values())
        recorded = _index_total_size(index)
        if recorded is not None and recorded != total:
            raise DataError(f"{index}: metadata.total_size is {recorded} but the shards hold {total} bytes of tensors")
    for path, held in shards.items():
        _check_packed(path, held)
    if expected is not None:
        _check_expected(folder, tensors, expected)
    return tensors


def check_adapter_folder(folder: Path) -> dict[str, TensorInfo]:
    """The light check of a PEFT adapter folder (`--lora-output adapter`): `adapter_config.json` is a LoRA config this
    tool can read, `adapter_model.safetensors` is the only weight file and holds floats only, and it is exactly as
    long as its header says.

    Args:
        folder (`Path`): an adapter folder.

    Returns:
        `dict[str, TensorInfo]`: the adapter's tensors by key.
    """
    model = next((name for name in (SINGLE_FILE, INDEX_FILE) if os.path.lexists(folder / name)), None)
    if model is not None:
        raise DataError(
            f"{folder}: holds both a PEFT adapter ({ADAPTER_CONFIG}) and model weights ({model}); loaders take it for an "
            "adapter: remove one"
        )
    weights = folder / ADAPTER_SAFETENSORS
    if not os.path.lexists(weights) and os.path.lexists(folder / ADAPTER_BIN):
        raise DataError(f"{folder / ADAPTER_BIN}: a pickled adapter; verify reads {ADAPTER_SAFETENSORS} (peft's default): re-save it")
    tensors = load_adapter_checkpoint(folder, BASE_STEP).source.tensors
    stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name != ADAPTER_SAFETENSORS)
    if stray:
        raise DataError(f"{folder / stray[0]}: a safetensors file beside the adapter's {ADAPTER_SAFETENSORS}; remove it")
    _check_packed(weights, sorted(tensors.values(), key=lambda t: t.start))
    return tensors


def check_output_folder(folder: Path) -> dict[str, TensorInfo]:
    """The light check of an output folder, as it is: a PEFT adapter's (`check_adapter_folder`) or a model's
    (`check_folder`). Returns the folder's tensors by name."""
    return check_adapter_folder(folder) if is_adapter_folder(folder) else check_folder(folder)


def by_shard(tensors: Mapping[str, TensorInfo]) -> dict[Path, list[TensorInfo]]:
    """The tensors of each shard, in file order; shards by name (one pass and a sort, whatever the shard count)."""
    shards: dict[Path, list[TensorInfo]] = {}
    for info in tensors.values():
        shards.setdefault(info.path, []).append(info)
    return {path: sorted(held, key=lambda t: t.start) for path, held in sorted(shards.items())}


def _index_total_size(index: Path) -> int | None:
    content = read_json_file(index, what="index", hint="re-save it")
    metadata = content.get("metadata") if isinstance(content, dict) else None
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def _check_packed(path: Path, tensors: list[TensorInfo]) -> None:
    """The tensors of one shard (in file order) lie end to end from the end of the header to the end of the file."""
    with open(path, "rb") as f:
        position = 8 + int.from_bytes(f.read(8), "little")
    for info in tensors:
        if info.start != position:
            raise DataError(f"{path}: tensor {info.name!r} starts at byte {info.start}, expected {position}; the shard has gaps")
        position += info.nbytes
    size = path.stat().st_size
    if size != position:
        raise DataError(f"{path}: {size} bytes, but its header describes {position}; the shard was not written completely")


def _check_expected(folder: Path, tensors: dict[str, TensorInfo], expected: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    for name, (dtype, shape) in expected.items():
        info = tensors.get(name)
        if info is None:
            raise DataError(f"{folder}: tensor {name!r} is missing from the written shards; nothing was published")
        if (info.dtype, info.shape) != (dtype, tuple(shape)):
            raise DataError(
                f"{info.path}: tensor {name!r} is {info.dtype} {list(info.shape)}, expected {dtype} {list(shape)}"
            )
    extra = [name for name in tensors if name not in expected]
    if extra:
        raise DataError(f"{tensors[extra[0]].path}: tensor {extra[0]!r} was not planned; the output is inconsistent")


def output_files(folder: Path, sha256: Mapping[str, str] | None = None) -> list[dict]:
    """The weight files of an output folder, by name, size and sha256, for the provenance record: a model's shards
    and index, or an adapter's weights and its `adapter_config.json` (which sets its ranks and scalings).

    Args:
        folder (`Path`): a model or adapter folder.
        sha256 (`Mapping[str, str]`, *optional*): digests already known, by file name (computed while writing, or
            while reading the values); any other file is read and hashed here (shards reused by `--resume`, another
            rank's shards, the index).

    Returns:
        `list[dict]`: `{"name", "size", "sha256"}` per file, by name.
    """
    sha256 = sha256 or {}
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors") or p.name in (INDEX_FILE, ADAPTER_CONFIG))
    return [
        {"name": name, "size": (folder / name).stat().st_size, "sha256": sha256.get(name) or file_sha256(folder / name)}
        for name in names
    ]


def file_sha256(path: Path, *, chunk: int = 2**20) -> str:
    """The sha256 of a file, read in chunks of `chunk` bytes into one buffer."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(chunk))
    try:
        with open(path, "rb", buffering=0) as f:
            while count := f.readinto(buffer):
                digest.update(buffer[:count])
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    return digest.hexdigest()


# --- full: everything a user can check before trusting the folder -------------------------------------------


def find_model_folders(output: Path) -> list[Path]:
    """The model folders of an output: the folder itself, or every subfolder holding a `bema_offline.json`."""
    if not output.is_dir():
        raise DataError(f"{output}: no such folder")
    weights = (output / SINGLE_FILE).exists() or (output / INDEX_FILE).exists() or is_adapter_folder(output)
    if (output / PROVENANCE_FILE).is_file() or weights:
        return [output]
    folders = sorted(p.parent for p in output.rglob(PROVENANCE_FILE))
    if not folders:
        raise DataError(f"{output}: no model weights and no {PROVENANCE_FILE} in it or its subfolders; is this a model folder?")
    return folders


def verify(
    output: str | Path,
    *,
    recompute: int = 0,
    seed: int | None = None,
    max_memory: int = DEFAULT_CHUNK_BYTES,
) -> list[FolderReport]:
    """Check every model folder of a `bema-average` output (or any safetensors model or adapter folder).

    Args:
        output (`str | Path`): an output folder; with several outputs, their parent.
        recompute (`int`, defaults to 0): recompute this many random tensors of each folder from the sources named
            in its `bema_offline.json`, and compare them bit for bit. An adapter output of a LoRA run is written
            again whole (it is small) and compared byte for byte.
        seed (`int`, *optional*): seed of the random choice of tensors to recompute.
        max_memory (`int`, defaults to 64 MiB): bytes of tensor data held at once while reading values.

    Returns:
        `list[FolderReport]`: one report per model folder.

    Raises:
        `DataError`: the first problem found, in one line.

    Example:

    ```python
    >>> [report.tensors for report in verify("runs/sft-bema", recompute=3)]
    [291]
    ```
    """
    reports = []
    for folder in find_model_folders(Path(output)):
        adapter = is_adapter_folder(folder)
        tensors = check_output_folder(folder)
        report = FolderReport(
            folder, len(tensors), len({t.path for t in tensors.values()}), (folder / PROVENANCE_FILE).is_file(), adapter
        )
        if not adapter:
            report.notes += check_config(folder, tensors)
        digests = check_values(tensors, max_memory=max_memory)
        reports.append(report)
        if not report.has_provenance:
            if recompute > 0:
                raise DataError(f"{folder}: no {PROVENANCE_FILE}, so the sources to recompute from are unknown")
            continue
        record = read_provenance(folder)
        report.notes += check_provenance(folder, record, tensors, digests)
        if record.get("redacted"):
            report.notes.append(f"{folder / PROVENANCE_FILE}: the copy made for the Hub, without local paths; the sources were not compared")
            if recompute > 0:
                raise DataError(f"{folder}: its {PROVENANCE_FILE} names no source folders (the Hub copy); recompute from the local output")
            continue
        if record["_lora"] is not None:  # sources: a base model and adapter checkpoints
            from .verify_lora import check_lora_output  # (torch: only for a LoRA run's outputs)

            check_lora_output(report, record, tensors, recompute=recompute, seed=seed, max_memory=max_memory)
            continue
        sources, notes = load_recorded_sources(record, folder)
        report.notes += notes
        check_against_sources(folder, record, tensors, sources)
        report.sources_checked = sorted(sources)
        if recompute > 0:
            if len(sources) < len(record["inputs"]):
                raise DataError(f"{folder}: cannot recompute, some source checkpoints named in {PROVENANCE_FILE} are gone")
            names = random.Random(seed).sample(sorted(tensors), min(recompute, len(tensors)))
            recompute_tensors(record, tensors, sources, names, max_memory=max_memory)
            report.recomputed = names
    return reports


def check_config(folder: Path, tensors: dict[str, TensorInfo]) -> list[str]:
    """`config.json` parses and agrees with the embedding shapes and the layer count; returns notes."""
    path = folder / "config.json"
    if not path.is_file():
        return [f"{folder}: no config.json; transformers cannot load the folder without one"]
    config = read_json_file(path, what="JSON", hint="fix or re-copy it from a checkpoint")
    if not isinstance(config, dict):
        raise DataError(f"{path}: not a JSON object; fix or re-copy it from a checkpoint")
    notes = []
    if isinstance(config.get("text_config"), dict):  # multimodal: the sizes live in sub-configs; check nothing
        return [f"{path}: a multimodal config; embedding and layer counts were not compared"]
    vocab = _int_field(config, ("vocab_size",))
    hidden = _int_field(config, _HIDDEN_KEYS)
    compare_embeddings = not any(key in config for key in _EMBEDDING_EXCEPTIONS)
    for name, info in tensors.items():
        if not compare_embeddings or not name.endswith(EMBEDDING_SUFFIXES) or len(info.shape) != 2:
            continue
        if vocab is not None and info.shape[0] != vocab:
            raise DataError(f"{info.path}: tensor {name!r} has {info.shape[0]} rows but {path} says vocab_size {vocab}")
        if hidden is not None and info.shape[1] != hidden:
            raise DataError(f"{info.path}: tensor {name!r} has {info.shape[1]} columns but {path} says hidden size {hidden}")
    layers = _int_field(config, _LAYER_KEYS)
    if layers is not None:
        layers += _int_field(config, ("num_nextn_predict_layers",)) or 0  # multi-token-prediction layers follow
    found = {int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.match(name))}
    if layers is not None and found and found != set(range(layers)):
        missing = sorted(set(range(layers)) - found)
        detail = f"layers {missing[:5]} have no tensors" if missing else f"tensors for layer {max(found)} beyond them"
        raise DataError(f"{folder}: {path.name} says {layers} layers but {detail}; the weights and the config disagree")
    float_dtypes = {info.dtype for info in tensors.values() if info.is_float}
    declared = config.get("torch_dtype", config.get("dtype"))
    if isinstance(declared, str) and len(float_dtypes) == 1:
        (actual,) = float_dtypes
        if DTYPES[actual].torch_name != declared:
            notes.append(f"{path}: says dtype {declared} but the float tensors are {actual} (harmless for loading)")
    return notes


def _int_field(config: dict, keys: Sequence[str]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_values(tensors: dict[str, TensorInfo], *, max_memory: int = DEFAULT_CHUNK_BYTES) -> dict[str, str]:
    """Every float value is finite; returns each shard's sha256 by file name, from the same single read.

    Each shard is read once, in file order, in reads of at most `max_memory` bytes (and 8 MiB) into one buffer: small
    tensors are read together, a large one in parts. float32 and bf16 are checked by the C kernel where it is built (no
    torch import), other dtypes by torch.
    """
    shards = by_shard(tensors)
    sizes = {path: _file_size(path) for path in shards}
    # reads of a few MiB are as fast as larger ones, and stay in the CPU's cache from the read to the hash and the check
    buffer = bytearray(max(8, min(max_memory, READ_BYTES, max(sizes.values(), default=0))))  # (8: at least one element)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    digests = {}
    with OpenFiles() as files:
        for path, held in shards.items():
            digest = hashlib.sha256()
            for start, stop, parts in _reads(held, sizes[path], len(buffer)):
                view = memoryview(buffer)[: stop - start]
                files.read_into(path, start, view)
                digest.update(view)
                for info, offset, count in parts:
                    if not _chunk_finite(info.dtype, view[offset : offset + count * info.itemsize], address + offset, count):
                        raise DataError(f"{info.path}: tensor {info.name!r} holds NaN or Inf values; do not use this model")
            digests[path.name] = digest.hexdigest()
    return digests


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def _reads(tensors: list[TensorInfo], size: int, limit: int) -> Iterator[tuple[int, int, list[tuple[TensorInfo, int, int]]]]:
    """The reads that cover a file of `size` bytes holding `tensors` (in file order), each at most `limit` bytes:
    `(start, stop, parts)`, where each part `(tensor, offset in the read, elements)` is a run of a float tensor's
    elements to check. Consecutive pieces share a read while they fit; a float part always lies at an offset that is a
    multiple of its item size, so that it can be read as an array in place."""
    start = position = 0
    parts: list[tuple[TensorInfo, int, int]] = []
    for piece_start, piece_stop, info in _pieces(tensors, size, limit):
        aligned = info is None or not info.is_float or (piece_start - start) % info.itemsize == 0
        if piece_stop - start > limit or not aligned:
            if position > start:
                yield start, position, parts
            start, parts = piece_start, []
        if info is not None and info.is_float:
            parts.append((info, piece_start - start, (piece_stop - piece_start) // info.itemsize))
        position = piece_stop
    if position > start:
        yield start, position, parts


def _pieces(tensors: list[TensorInfo], size: int, limit: int) -> Iterator[tuple[int, int, TensorInfo | None]]:
    """The byte ranges of a file, in order and without a gap: the header and any bytes between tensors (with no
    tensor), and each tensor's bytes, in pieces of at most `limit` bytes (whole elements; at least one)."""
    position = 0
    for info in [*tensors, None]:
        start, stop = (info.start, info.start + info.nbytes) if info is not None else (size, size)
        for first in range(position, start, limit):
            yield first, min(first + limit, start), None
        if info is not None:
            step = max(1, limit // info.itemsize) * info.itemsize
            for first in range(start, stop, step):
                yield first, min(first + step, stop), info
            position = max(position, stop)


def _chunk_finite(dtype: str, view: memoryview, address: int, count: int) -> bool:
    if dtype in KERNEL_DTYPES and kernel_name() is not None:
        return kernels.all_finite(kernels.Floats(address, count, bf16=dtype == "BF16"))
    import torch

    return all_finite(torch.frombuffer(view, dtype=torch.uint8).view(DTYPES[dtype].torch))


# --- the provenance record and the sources it names -----------------------------------------------------------


def read_provenance(folder: Path) -> dict:
    """Parse `bema_offline.json` and check that it has the fields verify relies on."""
    path = folder / PROVENANCE_FILE
    record = read_json_file(path, what="provenance record", hint="it was edited or damaged", limit=PROVENANCE_LIMIT)
    required = {"tool": str, "kind": str, "step": int, "settings": dict, "steps": dict,
                "effective_weights": list, "inputs": list, "tensors": int}  # fmt: skip
    if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in required.items()):
        raise DataError(f"{path}: lacks fields of a bema-offline provenance record; it was edited or damaged")
    method = record_method(record)
    if record["tool"] != "bema-offline" or method is None:
        raise DataError(f"{path}: not a bema-offline provenance record (tool {record['tool']!r}, kind {record['kind']!r})")
    try:
        record["_method"] = method
        record["_weights"] = {int(e["step"]): float(e["weight"]) for e in record["effective_weights"]}
        record["_inputs"] = {
            int(e["step"]): (Path(e["folder"]), [(str(f["name"]), f["size"], f["mtime_ns"]) for f in e["files"]])
            for e in record["inputs"]
        }
        if method.replayed:
            if record["kind"] not in KINDS:
                raise ValueError(f"kind {record['kind']!r}")
            record["_schedule"] = BEMASchedule(**record["schedule"])
            record["_update_steps"] = [int(s) for s in record["steps"]["update_steps_used"]]
        record["_lora"] = _lora_options(record.get("lora"))
        frozen = record.get("frozen_tensors")  # (None in records of older versions: decided again on the sources)
        if frozen is not None and not (isinstance(frozen, list) and all(isinstance(name, str) for name in frozen)):
            raise ValueError("frozen_tensors is not a list of names")
        record["_frozen"] = None if frozen is None else set(frozen)
    except (BemaError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: malformed provenance record ({e}); it was edited or damaged") from e
    return record


def _lora_options(lora: object) -> dict | None:
    """The `lora` entry of a LoRA run's record (None for other runs), with the options that shape the output checked."""
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise ValueError("lora is not an object")
    rank = lora.get("rank")
    if lora.get("output") not in LORA_OUTPUTS or lora.get("average") not in LORA_AVERAGES:
        raise ValueError(f"lora output {lora.get('output')!r}, average {lora.get('average')!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"lora rank {rank!r}")
    return lora


def check_provenance(folder: Path, record: dict, tensors: dict[str, TensorInfo], digests: Mapping[str, str] | None = None) -> list[str]:
    """`bema_offline.json` describes this folder: what it is (a model or a PEFT adapter), tensor count, files (names,
    sizes, sha256), dtype, shard size, and the weights. `digests` are the shards' sha256 already computed
    (`check_values`), by file name; others are read. Returns notes."""
    path = folder / PROVENANCE_FILE
    adapter, lora = is_adapter_folder(folder), record["_lora"]
    if adapter != (lora is not None and lora["output"] == "adapter"):
        recorded = "a PEFT adapter (--lora-output adapter)" if not adapter else "a model folder"
        raise DataError(f"{path}: describes {recorded}, but the folder is {'an adapter' if adapter else 'a model folder'}; it was edited or damaged")
    if record["tensors"] != len(tensors):
        raise DataError(f"{path}: records {record['tensors']} tensors but the folder holds {len(tensors)}")
    notes = _check_output_files(folder, record.get("output_files"), digests)
    dtype = record["settings"].get("dtype")
    if dtype is not None:
        want = FLOAT_DTYPES.get(dtype)
        # (an adapter keeps peft's frozen copies of base layers as saved; verify_lora checks each tensor's dtype)
        wrong = next((i for i in tensors.values() if i.is_float and i.dtype != want and not (adapter and ".base_layer." in i.name)), None)
        if wrong is not None:
            raise DataError(f"{wrong.path}: tensor {wrong.name!r} is {wrong.dtype} but {path.name} says --dtype {dtype}")
    max_shard = record["settings"].get("max_shard_size")
    if isinstance(max_shard, int) and not adapter:  # (an adapter is one file, whatever --max-shard-size)
        for shard, held in by_shard(tensors).items():
            if len(held) > 1 and sum(i.nbytes for i in held) > max_shard:
                raise DataError(f"{shard}: holds more than the recorded max_shard_size {max_shard} bytes")
    step = record["step"]
    if record["_method"].replayed:
        schedule, update_steps = record["_schedule"], record["_update_steps"]
        if not update_steps or update_steps[-1] != step:
            raise DataError(f"{path}: step {step} is not the last of the update steps used {update_steps}")
        expected = effective_weights(schedule, update_steps, [step], record["kind"])[step]
    else:
        try:
            expected = record["_method"].weights(
                [int(s) for s in record["steps"]["found"]], base=record.get("base_model") is not None,
                allow_missing=bool(record["settings"].get("allow_missing")),
            )
        except (BemaError, TypeError, ValueError) as e:
            raise DataError(f"{path}: the recorded method cannot be recomputed ({e}); it was edited or damaged") from e
        if max(expected) != step:
            raise DataError(f"{path}: step {step} is not the newest source of the recorded method's weights")
    weights = record["_weights"]
    if set(weights) != set(expected) or any(not math.isclose(weights[s], w, rel_tol=1e-9, abs_tol=1e-12) for s, w in expected.items()):
        raise DataError(f"{path}: the effective weights do not follow from the recorded method; it was edited or damaged")
    if lora is None and set(record["_inputs"]) != set(weights):
        raise DataError(f"{path}: the inputs listed are not the steps with a weight")
    if lora is not None and set(record["_inputs"]) != set(weights) | {BASE_STEP}:  # the base is W0 of every checkpoint
        raise DataError(f"{path}: the inputs listed are not the base model and the steps with a weight")
    return notes


def _check_output_files(folder: Path, recorded: object, digests: Mapping[str, str] | None) -> list[str]:
    """The weight files recorded in the provenance are the folder's: same names and sizes, and the same sha256 where
    recorded (outputs of older versions record none: a note says so)."""
    path = folder / PROVENANCE_FILE
    older = f"{path}: records no sha256 of the weight files (an output of an older bema-offline), so their bytes were not checked against it"
    if recorded is None:
        return [older]
    if not isinstance(recorded, list) or not all(isinstance(entry, dict) for entry in recorded):
        raise DataError(f"{path}: malformed output_files; it was edited or damaged")
    actual = output_files(folder, digests)
    notes = []
    if ADAPTER_CONFIG in [entry["name"] for entry in actual] and ADAPTER_CONFIG not in [entry.get("name") for entry in recorded]:
        actual = [entry for entry in actual if entry["name"] != ADAPTER_CONFIG]
        notes.append(f"{path}: records no sha256 of {ADAPTER_CONFIG} (an adapter of an older bema-offline), so its bytes were not checked against it")
    if [(entry.get("name"), entry.get("size")) for entry in recorded] != [(entry["name"], entry["size"]) for entry in actual]:
        raise DataError(f"{path}: the weight files it records differ from the folder's (names or sizes); a file was replaced")
    if not any("sha256" in entry for entry in recorded):
        return [older]
    for want, have in zip(recorded, actual):
        if want.get("sha256") != have["sha256"]:
            raise DataError(
                f"{folder / have['name']}: its sha256 differs from the one recorded in {PROVENANCE_FILE}; the file changed "
                "after it was written (a flipped bit, an edit): do not use it"
            )
    return notes


def load_recorded_sources(record: dict, folder: Path) -> tuple[dict[int, WeightSource], list[str]]:
    """The source checkpoints named in the provenance that still exist, and notes on those gone or changed."""
    gone = recorded_sources_gone(record)
    sources = {}
    for step, (source_folder, _) in sorted(record["_inputs"].items()):
        if is_adapter_folder(source_folder):  # (a LoRA run's record has a lora entry, and verify_lora reads its sources)
            raise DataError(
                f"{folder / PROVENANCE_FILE}: names the PEFT adapter {source_folder} as a source but has no lora entry; "
                "it was edited or damaged"
            )
        if source_folder.is_dir():
            sources[step] = load_source(source_folder, step)
    if sources:  # a tied head that FSDP or DeepSpeed saved, left out of the output as the run left it out of its plan
        untie_head(sources, sources[max(sources)])
    notes = [f"{folder}: {len(gone)} source folders are gone (e.g. {gone[0]}); they were not compared"] if gone else []
    return sources, notes + recorded_sources_changed(record, folder)


def recorded_sources_gone(record: dict) -> list[str]:
    """The source folders named in the provenance that no longer exist."""
    return [str(source_folder) for _, (source_folder, _) in sorted(record["_inputs"].items()) if not source_folder.is_dir()]


def recorded_sources_changed(record: dict, folder: Path) -> list[str]:
    """A note when source files named in the provenance changed (size or time) since the output was made."""
    changed = []
    for _, (source_folder, files) in sorted(record["_inputs"].items()):
        for name, size, mtime_ns in files if source_folder.is_dir() else ():
            path = source_folder / name
            stat = path.stat() if path.is_file() else None
            if stat is None or (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
                changed.append(str(path))
    return [f"{folder}: {len(changed)} source files changed since the output was made (e.g. {changed[0]})"] if changed else []


def planned_dtype(record: dict, source_info: TensorInfo) -> str:
    """The dtype of an output tensor made from `source_info`, as the recorded settings (`--dtype`) make it."""
    dtype = record["settings"].get("dtype")
    if dtype in FLOAT_DTYPES and source_info.is_float:
        return FLOAT_DTYPES[dtype]
    return source_info.dtype


def check_against_sources(folder: Path, record: dict, tensors: dict[str, TensorInfo], sources: dict[int, WeightSource]) -> None:
    """Every output tensor exists in every source with the same shape, and the dtype the settings imply."""
    for step, source in sorted(sources.items()):
        for name, info in tensors.items():
            origin = source.tensors.get(name)
            if origin is None:
                raise DataError(f"{info.path}: tensor {name!r} is not in the source {source.label}")
            if origin.shape != info.shape:
                raise DataError(f"{info.path}: tensor {name!r} is {list(info.shape)} but {list(origin.shape)} in {source.label}")
            if step != BASE_STEP and planned_dtype(record, origin) != info.dtype:
                raise DataError(f"{info.path}: tensor {name!r} is {info.dtype} but {origin.dtype} in {source.label}")
        if step != BASE_STEP:
            extra = next((name for name in source.tensors if name not in tensors), None)
            if extra is not None:
                raise DataError(f"{folder}: tensor {extra!r} of {source.label} is missing from the output")


# --- recompute ---------------------------------------------------------------------------------------------------


class CompareSink(Sink):
    """Compares each recomputed slice with the bytes already in the output folder."""

    def __init__(self, tensors: dict[str, TensorInfo]) -> None:
        self.tensors = tensors
        self.files = OpenFiles()
        self.compared: dict[str, int] = {}

    def write(self, output_index: int, piece: Slice, data: memoryview) -> None:
        info = self.tensors[piece.name]
        fresh = bytes(data)
        stored = bytearray(len(fresh))
        self.files.read_into(info.path, info.start + piece.start * info.itemsize, memoryview(stored))
        if fresh != stored:
            element = piece.start + next(i for i, (a, b) in enumerate(zip(fresh, stored)) if a != b) // info.itemsize
            raise DataError(
                f"{info.path}: tensor {piece.name!r} differs from its recomputation at element {element}; "
                "the output is wrong or its sources changed: do not use it"
            )
        self.compared[piece.name] = self.compared.get(piece.name, 0) + piece.numel


def recompute_tensors(
    record: dict, tensors: dict[str, TensorInfo], sources: dict[int, WeightSource], names: Sequence[str], *, max_memory: int
) -> None:
    """Recompute the recorded method on `names` only, with the same engine, and compare every slice bit for bit."""
    reference = sources[max(sources)]
    method, step, kind = record["_method"], record["step"], record["kind"]
    if method.replayed:
        schedules, output = [ScheduleRun("", record["_schedule"], record["_update_steps"], [])], OutputSpec(0, kind, step, "", record["_weights"])
    else:
        schedules, output = [], OutputSpec(None, kind, step, "", record["_weights"], "", method)
    plan = Plan(
        run_dir=Path(record.get("run_dir", ".")),
        found_steps=sorted(s for s in sources if s != BASE_STEP),
        schedules=schedules,
        outputs=[output],
        sources=sources,
        tensors=[reference.tensors[name] for name in names],
        output_dtypes={name: planned_dtype(record, reference.tensors[name]) for name in names},
    )
    accum = record["settings"].get("accum_dtype")
    accum = accum if accum in ("float32", "float64") else "float32"
    sink = CompareSink(tensors)
    try:
        Engine(plan, sink, accum_dtype=accum, max_memory=max(max_memory, 2**20), frozen=record["_frozen"]).run()
    finally:
        sink.files.close()
    short = [name for name in names if sink.compared.get(name, 0) != tensors[name].numel]
    if short:
        raise DataError(f"{tensors[short[0]].path}: tensor {short[0]!r} was not fully recomputed; report this bug")
