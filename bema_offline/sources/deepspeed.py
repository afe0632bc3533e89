"""The DeepSpeed ZeRO reader: `global_stepN/` partitions of the fp32 master weights, where no model weights were saved.

DeepSpeed's `save_checkpoint` (which the Trainer calls under ZeRO) writes, in `global_stepN/`:
- `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`, one per data-parallel rank: the optimizer state, holding that
  rank's partition of the fp32 master weights, one flat tensor per parameter group;
- `mp_rank_00_model_states.pt` (ZeRO-1/2) or `zero_pp_rank_R_mp_rank_00_model_states.pt` (ZeRO-3): the parameter
  names and shapes in flat order, the buffers, the frozen parameters and the tied ones.

The parameters are cut out of the partitions exactly as DeepSpeed's own `zero_to_fp32.py` does it, as extents, so
each tensor streams from the partition files without a consolidated copy:
- ZeRO-1/2: a group's partitions, concatenated in rank order, are the group's parameters back to back (then padding);
- ZeRO-3: each parameter is split into `ceil(numel / world_size)` elements per rank (the last rank padded), and each
  rank's flat groups hold its slices of every parameter back to back.

Both files are read with the `.bin` parser; DeepSpeed's own objects in them (its loss scaler, its stage enum) become
inert `Opaque` records: DeepSpeed need not be installed, and nothing pickled is run.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from ..errors import DataError
from ..files import FileIdentity, read_small_file
from .tensors import Extent, TensorInfo, WeightSource
from .torch_bin import Opaque, Storage, StoredTensor, TorchArchive, open_file, shown_value

LATEST_FILE = "latest"
_OPTIM = re.compile(r"(?:bf16_|fp16_)?zero_pp_rank_([0-9]+)_mp_rank_([0-9]+)_optim_states\.pt")
_MODEL = re.compile(r"(?:zero_pp_rank_([0-9]+)_)?mp_rank_([0-9]+)_model_states\.pt")
_TAG = re.compile(r"[^/\\\0]+")


def is_deepspeed_folder(folder: Path) -> bool:
    """Whether `folder` holds a DeepSpeed checkpoint: a `latest` file, or a `global_step*` folder."""
    return (folder / LATEST_FILE).is_file() or any(path.is_dir() for path in folder.glob("global_step*"))


def convert_command(folder: Path) -> str:
    """DeepSpeed's own command that writes the consolidated fp32 weights of a checkpoint as safetensors, into the
    checkpoint folder itself (where this tool then reads them)."""
    script = folder / "zero_to_fp32.py"
    program = f"python {shlex.quote(str(script))}" if script.is_file() else "python -m deepspeed.utils.zero_to_fp32"
    return f"{program} {shlex.quote(str(folder))} {shlex.quote(str(folder))} --safe_serialization"


def load_deepspeed(folder: Path, step: int) -> WeightSource:
    """Read where each parameter's fp32 master weights lie in a DeepSpeed ZeRO checkpoint (`folder/latest` names
    the `global_stepN` folder). No tensor data is read.

    Args:
        folder (`Path`): the checkpoint folder (`checkpoint-N`, holding `latest` and `global_stepN/`).
        step (`int`): its step.

    Returns:
        `WeightSource`: the parameters (fp32), the buffers and frozen parameters (in their saved dtype).

    Raises:
        `DataError`: a missing partition or model-states file, or a variant that cannot be streamed (the message gives
            the exact `zero_to_fp32.py` command that converts it).
    """
    tag_dir = folder / _tag(folder)
    identities: dict[Path, FileIdentity] = {}
    optim_files, model_files = _partition_files(folder, tag_dir)
    partitions = [_read_partition(path, identities, folder) for path in optim_files]
    stage, world_size, _ = partitions[0]
    for path, (other_stage, other_size, _) in zip(optim_files, partitions):
        if (other_stage, other_size) != (stage, world_size):
            raise DataError(f"{path}: ZeRO stage {other_stage} with {other_size} partitions, but rank 0 says stage {stage} with {world_size}; the checkpoint mixes two runs")
    if world_size != len(optim_files):
        raise DataError(
            f"{tag_dir}: ZeRO partitions for {world_size} ranks are expected but {len(optim_files)} were found; "
            "the checkpoint is incomplete (was it saved by every rank, or copied only in part?)"
        )
    states = _read_model_states(stage, world_size, model_files, tag_dir, identities)
    groups = [flat for _, _, flat in partitions]
    builder = _Zero3 if stage == 3 else _Zero12
    tensors = builder(world_size, groups, states, folder).tensors()
    model_dtype = _module_dtype(states[0])
    notes = [
        f"read the fp32 master weights of DeepSpeed ZeRO-{stage} ({tag_dir.name}, {world_size} partitions)"
        + (f", more precise than the {model_dtype} weights the model trained in" if model_dtype and model_dtype != "F32" else "")
    ]
    if stage < 3 and states[0].unrecorded:
        names = ", ".join(list(states[0].unrecorded)[:4])
        notes.append(f"{len(states[0].unrecorded)} parameters DeepSpeed keeps out of its partitions (frozen ones) were read from the model states, in the dtype the model trained in: {names}")
    tied = {alias: origin for alias, origin in states[0].shared.items() if origin in tensors and alias not in tensors}
    if tied:
        shown = ", ".join(f"{alias} (= {origin})" for alias, origin in list(tied.items())[:4])
        notes.append(f"{len(tied)} tied parameters are stored once, under the name they tie to, as save_pretrained stores them: {shown}")
    ordered = {name: tensors[name] for name in _names_in_order(states[0], tensors)}
    return WeightSource(step, folder, ordered, identities, layout=f"deepspeed zero-{stage} fp32 master weights", notes=tuple(notes))


def _tag(folder: Path) -> str:
    """The `global_stepN` folder: the one `latest` names, else the only one there is."""
    latest = folder / LATEST_FILE
    if latest.is_file():
        tag = read_small_file(latest, limit=4096, what="DeepSpeed tag file").decode("utf-8", "replace").strip()
        if not _TAG.fullmatch(tag) or tag in (".", ".."):
            raise DataError(f"{latest}: names {tag!r}, which is not a folder name; fix the file to name the global_stepN folder")
        if not (folder / tag).is_dir():
            raise DataError(f"{latest}: names {tag}, which is missing from {folder}; the checkpoint is incomplete")
        return tag
    tags = sorted(path.name for path in folder.glob("global_step*") if path.is_dir())
    if len(tags) != 1:
        raise DataError(f"{folder}: no {LATEST_FILE} file to choose among {', '.join(tags)}; write the tag to use into {latest}")
    return tags[0]


def _partition_files(folder: Path, tag_dir: Path) -> tuple[list[Path], dict[int | None, Path]]:
    """The optimizer partitions in rank order, and the model-states files by rank (None: the one ZeRO-1/2 file)."""
    optim: dict[int, Path] = {}
    model: dict[int | None, Path] = {}
    for path in sorted(tag_dir.iterdir()):
        if match := _OPTIM.fullmatch(path.name):
            if match.group(2) != "00":
                raise _unsupported(folder, f"{path.name} is a tensor-parallel partition (model-parallel rank {match.group(2)})")
            rank = int(match.group(1))
            if rank in optim:
                raise DataError(f"{tag_dir}: {optim[rank].name} and {path.name} are both the partition of rank {rank}; remove the stale one")
            optim[rank] = path
        elif match := _MODEL.fullmatch(path.name):
            if match.group(2) != "00":
                raise _unsupported(folder, f"{path.name} is a tensor-parallel partition (model-parallel rank {match.group(2)})")
            model[None if match.group(1) is None else int(match.group(1))] = path
        elif path.name.startswith("layer_") and path.name.endswith("model_states.pt"):
            raise _unsupported(folder, f"{path.name} belongs to a pipeline-parallel checkpoint")
    if not optim:
        raise DataError(
            f"{tag_dir}: no *_optim_states.pt ZeRO partitions, so no fp32 master weights (DeepSpeed without ZeRO keeps "
            "them elsewhere, or the checkpoint was saved without its optimizer); load it with DeepSpeed and save the "
            "model with save_pretrained"
        )
    missing = [rank for rank in range(max(optim) + 1) if rank not in optim]
    if missing:
        raise DataError(
            f"{tag_dir}: the optimizer partition of rank {missing[0]} (zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt) "
            "is missing; the checkpoint is incomplete"
        )
    return [optim[rank] for rank in sorted(optim)], model


def _read_partition(path: Path, identities: dict[Path, FileIdentity], folder: Path) -> tuple[int, int, list[Extents]]:
    """One rank's optimizer file: the ZeRO stage, the number of partitions, and the extents of its fp32 flat groups
    (its partition of each parameter group's fp32 master weights)."""
    with open_file(path, identities) as region:
        archive = TorchArchive(region, opaque=True)
        state = _get(archive.root, "optimizer_state_dict", path)
        stage = _int(_get(state, "zero_stage", path), "zero_stage", path)
        counts = _get(state, "partition_count", path)
        counts = counts if isinstance(counts, list) else [counts]
        counts = [_int(count, "partition_count", path) for count in counts]
        if len(set(counts)) != 1:
            raise _unsupported(folder, f"its parameter groups are split over different numbers of ranks ({counts}, e.g. expert parallelism)")
        key = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups", 3: "fp32_flat_groups"}.get(stage)
        if key is None:
            raise _unsupported(folder, f"ZeRO stage {stage} is not one that holds fp32 partitions")
        groups = state.get(key) if isinstance(state, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, StoredTensor) for g in groups):
            raise _unsupported(folder, f"{path.name} has no {key} list of tensors")
        flats = []
        for index, group in enumerate(groups):
            info = archive.tensor_info(f"{key}[{index}]", group)
            if info.dtype != "F32" or len(info.shape) != 1:
                raise _unsupported(folder, f"{path.name}: {key}[{index}] is {info.dtype} of shape {list(info.shape)}, not a flat fp32 tensor")
            flats.append(Extents(list(info.extents), info.numel))
    return stage, counts[0], flats


class _ModelStates:
    """What a model-states file says: parameter shapes by group (flat order), buffers, frozen parameters, ties."""

    def __init__(self, path: Path, identities: dict[Path, FileIdentity]) -> None:
        self.path = path
        with open_file(path, identities) as region:
            archive = TorchArchive(region, opaque=True)
            root = archive.root
            shapes = _get(root, "param_shapes", path)
            if isinstance(shapes, dict):
                shapes = [shapes]
            if not isinstance(shapes, list) or not all(isinstance(group, dict) for group in shapes):
                raise DataError(f"{path}: malformed param_shapes; the checkpoint is corrupt")
            self.param_shapes = [{_name(name, path): _shape(shape, name, path) for name, shape in group.items()} for group in shapes]
            module = _get(root, "module", path)
            if not isinstance(module, dict):
                raise DataError(f"{path}: malformed module state dict; the checkpoint is corrupt")
            self.module_names = [_name(name, path) for name in module]
            trained = {name for group in self.param_shapes for name in group}
            self.model_dtypes = {t.storage.dtype for n, t in module.items() if n in trained and isinstance(t, StoredTensor) and isinstance(t.storage, Storage)}
            buffer_names = _container(root.get("buffer_names"), list, "buffer_names", path)
            self.buffers = {name: archive.tensor_info(name, module[name]) for name in buffer_names if name in module}
            frozen_shapes = _container(root.get("frozen_param_shapes"), dict, "frozen_param_shapes", path)
            fragments = _container(root.get("frozen_param_fragments"), dict, "frozen_param_fragments", path)
            self.frozen_shapes = {_name(name, path): _shape(shape, name, path) for name, shape in frozen_shapes.items()}
            self.fragments = {name: archive.tensor_info(name, fragments[name]) for name in frozen_shapes if name in fragments}
            shared = _container(root.get("shared_params"), dict, "shared_params", path)
            self.shared = {alias: origin for alias, origin in shared.items() if isinstance(alias, str) and isinstance(origin, str)}
            # ZeRO-1 records no frozen parameters: the module's own copy (whole under ZeRO-1/2) is all there is
            named = {n for group in self.param_shapes for n in group} | set(self.buffers) | set(self.frozen_shapes) | set(self.shared)
            self.unrecorded = {
                name: archive.tensor_info(name, tensor)
                for name, tensor in module.items()
                if name not in named and isinstance(tensor, StoredTensor) and _is_whole(tensor)
            }


def _read_model_states(stage: int, world_size: int, files: dict[int | None, Path], tag_dir: Path, identities) -> list[_ModelStates]:
    """The model-states files a stage needs: ZeRO-1/2 one; ZeRO-3 every rank's (each holds its frozen fragments)."""
    ranks = [None] if stage < 3 else list(range(world_size))
    for rank in ranks:
        if rank not in files:
            name = "mp_rank_00_model_states.pt" if rank is None else f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
            raise DataError(f"{tag_dir}: {name} is missing; the checkpoint is incomplete")
    return [_ModelStates(files[rank], identities) for rank in ranks]


class Extents:
    """A flat run of elements stored as extents (one rank's flat group, or several concatenated)."""

    def __init__(self, extents: list[Extent], numel: int) -> None:
        self.extents, self.numel = extents, numel

    @classmethod
    def concatenate(cls, parts: list[Extents]) -> Extents:
        extents, numel = [], 0
        for part in parts:
            extents += [Extent(e.path, e.offset, e.first + numel, e.stop + numel) for e in part.extents]
            numel += part.numel
        return cls(extents, numel)

    def slice(self, first: int, stop: int, at: int, itemsize: int = 4) -> list[Extent]:
        """Elements [first, stop) as extents numbered from `at`."""
        pieces = []
        for e in self.extents:
            lo, hi = max(first, e.first), min(stop, e.stop)
            if lo < hi:
                pieces.append(Extent(e.path, e.offset + (lo - e.first) * itemsize, at + lo - first, at + hi - first))
        return pieces


class _Zero12:
    """ZeRO-1/2: each group's partitions, in rank order, hold its parameters back to back, then alignment padding."""

    def __init__(self, world_size: int, groups: list[list[Extents]], states: list[_ModelStates], folder: Path) -> None:
        self.world_size, self.groups, self.states, self.folder = world_size, groups, states, folder

    def tensors(self) -> dict[str, TensorInfo]:
        states = self.states[0]
        if len(states.param_shapes) != len(self.groups[0]):
            raise _unsupported(self.folder, f"{len(states.param_shapes)} parameter groups are named but {len(self.groups[0])} are stored")
        tensors = dict(states.buffers) | states.unrecorded
        for name, shape in states.frozen_shapes.items():  # stored whole, in their own dtype
            fragment = states.fragments.get(name)
            if fragment is None or fragment.numel != math.prod(shape):
                raise DataError(f"{states.path}: the frozen parameter {name!r} is not stored whole; the checkpoint is corrupt")
            tensors[name] = TensorInfo(name, fragment.dtype, shape, fragment.extents)
        for index, shapes in enumerate(states.param_shapes):
            merged = Extents.concatenate([rank_groups[index] for rank_groups in self.groups])
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                if offset + numel > merged.numel:
                    raise _unsupported(self.folder, f"parameter {name!r} runs past its group's {merged.numel} elements")
                tensors[name] = _info(name, shape, merged.slice(offset, offset + numel, 0), states.path)
                offset += numel
            align = 2 * self.world_size  # zero_to_fp32's check: the group is its parameters plus alignment padding
            if math.ceil(offset / align) * align != math.ceil(merged.numel / align) * align:
                raise _unsupported(self.folder, f"parameter group {index} holds {merged.numel} elements but its parameters need {offset}")
        return tensors


class _Zero3:
    """ZeRO-3: each parameter is cut into `ceil(numel / world_size)` elements per rank, in rank order (the last
    padded); each rank's flat groups, concatenated, hold its slices of every parameter in order."""

    def __init__(self, world_size: int, groups: list[list[Extents]], states: list[_ModelStates], folder: Path) -> None:
        self.world_size, self.groups, self.states, self.folder = world_size, groups, states, folder

    def tensors(self) -> dict[str, TensorInfo]:
        states, ws = self.states[0], self.world_size
        sizes = [g.numel for g in self.groups[0]]
        for rank, rank_groups in enumerate(self.groups):
            if [g.numel for g in rank_groups] != sizes:
                raise _unsupported(self.folder, f"rank {rank}'s flat groups have other sizes than rank 0's")
        flats = [Extents.concatenate(rank_groups) for rank_groups in self.groups]
        tensors = dict(states.buffers)
        tensors.update(self._frozen())
        offset = 0
        for name, shape in ((n, s) for group in states.param_shapes for n, s in group.items()):
            numel = math.prod(shape)
            per_rank = math.ceil(numel / ws)
            if offset + per_rank > flats[0].numel:
                raise _unsupported(self.folder, f"parameter {name!r} runs past the {flats[0].numel} elements of each partition")
            extents = []
            for rank, flat in enumerate(flats):
                count = max(0, min(per_rank, numel - rank * per_rank))
                extents += flat.slice(offset, offset + count, rank * per_rank)
            tensors[name] = _info(name, shape, extents, states.path)
            offset += per_rank
        if offset != flats[0].numel:  # zero_to_fp32's check
            raise _unsupported(self.folder, f"the partitions hold {flats[0].numel} elements each but the parameters need {offset}")
        return tensors

    def _frozen(self):
        """ZeRO-3 frozen parameters: each rank's model-states file holds its fragment, as for trainable ones."""
        first = self.states[0]
        for name, shape in first.frozen_shapes.items():
            numel, extents, at = math.prod(shape), [], 0
            dtype = None
            for states in self.states:
                fragment = states.fragments.get(name)
                if fragment is None:
                    raise DataError(f"{states.path}: the frozen parameter {name!r} has no fragment; the checkpoint is incomplete")
                dtype = fragment.dtype
                flat = Extents(list(fragment.extents), fragment.numel)
                extents += flat.slice(0, min(fragment.numel, numel - at), at, fragment.itemsize)
                at += fragment.numel
                if at >= numel:
                    break
            if at < numel:
                raise DataError(f"{first.path}: the fragments of frozen parameter {name!r} hold {at} of its {numel} elements; the checkpoint is incomplete")
            yield name, TensorInfo(name, dtype, shape, tuple(extents))


def _info(name: str, shape: tuple[int, ...], extents: list[Extent], path: Path) -> TensorInfo:
    if not extents:
        extents = [Extent(path, 0, 0, 0)]
    return TensorInfo(name, "F32", shape, tuple(extents))


def _names_in_order(states: _ModelStates, tensors: dict[str, TensorInfo]) -> list[str]:
    """The model's state-dict order, then anything else (it decides the order of the output's tensors)."""
    ordered = [name for name in states.module_names if name in tensors]
    return ordered + [name for name in tensors if name not in set(ordered)]


def _is_whole(tensor: StoredTensor) -> bool:
    """Whether a module tensor holds data (ZeRO-3 saves empty placeholders for its partitioned parameters)."""
    shape = tensor.shape
    return isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) and math.prod(shape) > 0


def _module_dtype(states: _ModelStates) -> str | None:
    """The dtype the model trained in: that of the module's copies of the parameters (bf16 beside fp32 masters)."""
    return next(iter(states.model_dtypes)) if len(states.model_dtypes) == 1 else None


def _container(value: object, kind: type, what: str, path: Path):
    """An optional list or dict of a model-states file (None or absent: empty)."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise DataError(f"{path}: malformed {what} ({type(value).__name__}, not a {kind.__name__}); the checkpoint is corrupt")
    return value


def _name(value: object, path: Path) -> str:
    if not isinstance(value, str):
        raise DataError(f"{path}: a parameter name is {shown_value(value)}, not a string; the checkpoint is corrupt")
    return value


def _get(container: object, key: str, path: Path) -> object:
    if not isinstance(container, dict) or key not in container:
        raise DataError(f"{path}: no {key!r}; this is not a DeepSpeed ZeRO checkpoint file, or it is corrupt")
    return container[key]


def _int(value: object, what: str, path: Path) -> int:
    """An int, or DeepSpeed's int enum (ZeroStageEnum) as the pickle built it."""
    if isinstance(value, Opaque) and len(value.args) == 1:
        value = value.args[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"{path}: malformed {what} {shown_value(value)}; the checkpoint is corrupt")
    return value


def _shape(value: object, name: str, path: Path) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in value)):
        raise DataError(f"{path}: parameter {name!r} has a malformed shape {shown_value(value)}; the checkpoint is corrupt")
    return value


def _unsupported(folder: Path, why: str) -> DataError:
    return DataError(f"{folder}: a DeepSpeed checkpoint this tool cannot stream ({why}); convert it with DeepSpeed's own script: {convert_command(folder)}")
