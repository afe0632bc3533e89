"""Find a run's `checkpoint-N/` folders and the base model, and describe their tensors (headers only).

Nothing here reads tensor data: a `WeightSource` maps each tensor name to where its bytes lie.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, UsageError
from .safetensors_io import TensorInfo, parse_json, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BASE_STEP = 0
_CHECKPOINT_NAME = re.compile(r"checkpoint-(.*)", re.DOTALL)
_STEP_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


@dataclass(frozen=True)
class WeightSource:
    """The weights at one step: a checkpoint folder, or the base model (step 0)."""

    step: int
    folder: Path
    tensors: dict[str, TensorInfo]

    @property
    def label(self) -> str:
        return f"base model {self.folder}" if self.step == BASE_STEP else f"step {self.step} ({self.folder})"

    @property
    def files(self) -> list[Path]:
        return sorted({t.path for t in self.tensors.values()})


def find_checkpoints(run_dir: str | Path, *, min_step: int | None = None, max_step: int | None = None) -> dict[int, Path]:
    """The `checkpoint-N` folders of a run, by step, sorted, narrowed to `[min_step, max_step]`.

    Raises:
        `DataError`: the folder is missing, holds no checkpoints, or holds ambiguous ones.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.is_symlink():
            raise DataError(f"{run_dir}: a broken link or a link loop, not a folder; pass the output_dir of a Trainer run")
        raise DataError(f"{run_dir}: no such folder; pass the output_dir of a Trainer run")
    try:
        entries = sorted(os.listdir(run_dir))
    except OSError as e:
        raise DataError(f"{run_dir}: cannot list the folder ({e.strerror or e})") from e
    found: dict[int, Path] = {}
    for entry in entries:
        match = _CHECKPOINT_NAME.fullmatch(entry)
        if not match:
            continue
        path = run_dir / entry
        if not _STEP_NUMBER.fullmatch(match.group(1)):
            raise DataError(f"{path}: checkpoint folder name without a step number; rename it checkpoint-<step> or move it away")
        if not path.is_dir():
            raise DataError(f"{path}: not a folder (a broken link or a link loop?); fix or remove it")
        step = int(match.group(1))
        if step in found:
            raise DataError(f"{found[step]} and {path} are both step {step}; remove one of them")
        found[step] = path
    if not found:
        raise DataError(f"{run_dir}: no checkpoint-N folders found; pass the output_dir of a Trainer run")
    narrowed = {
        step: path
        for step, path in sorted(found.items())
        if (min_step is None or step >= min_step) and (max_step is None or step <= max_step)
    }
    if not narrowed:
        raise DataError(
            f"{run_dir}: no checkpoint between --min-step {min_step} and --max-step {max_step} "
            f"(found steps {_steps_text(found)})"
        )
    return narrowed


def load_source(folder: Path, step: int) -> WeightSource:
    """Read the safetensors headers (single file or sharded with an index) of one model folder.

    Raises:
        `DataError`: no safetensors weights, a missing shard, or a corrupt header.
    """
    index_path = folder / INDEX_FILE
    single = folder / SINGLE_FILE
    for path in (index_path, single):
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path}: a broken link or a link loop; fix or remove it")
        if path.exists() and not path.is_file():
            raise DataError(f"{path}: not a regular file; replace it with the saved weights")
    if index_path.is_file():
        tensors = _read_sharded(index_path)
    elif single.is_file():
        tensors, _ = read_header(single)
    else:
        raise _no_weights_error(folder)
    if not tensors:
        where = index_path if index_path.is_file() else single
        raise DataError(f"{where}: holds no tensors; the checkpoint is empty or was not saved completely")
    return WeightSource(step, folder, tensors)


def _no_weights_error(folder: Path) -> DataError:
    """Say why a folder has no weights this tool can read."""
    try:
        names = os.listdir(folder) if folder.is_dir() else []
    except OSError as e:
        return DataError(f"{folder}: cannot list the folder ({e.strerror or e})")
    if any(n.endswith(".bin") for n in names):
        return DataError(
            f"{folder}: only PyTorch .bin weights; bema-average streams safetensors: re-save with "
            "save_safetensors=True (or model.save_pretrained(..., safe_serialization=True))"
        )
    if "adapter_model.safetensors" in names:
        return DataError(f"{folder}: a PEFT adapter checkpoint; merge the adapters into full weights first")
    return DataError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; is this a model folder?")


def _read_sharded(index_path: Path) -> dict[str, TensorInfo]:
    try:
        raw = index_path.read_bytes()
    except OSError as e:
        raise DataError(f"{index_path}: cannot read ({e.strerror or e})") from e
    index = parse_json(raw, what=f"{index_path}: malformed index", hint="re-save the checkpoint")
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
        headers[shard], _ = read_header(shard_path)
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


def resolve_base_model(base_model: str | Path) -> Path:
    """A local model folder as is, or a Hub repo id fetched through huggingface_hub's cache.

    Only the safetensors weights and the small config and tokenizer files are downloaded.
    """
    local = Path(base_model).expanduser()
    if local.is_dir():
        return local
    text = str(base_model)
    if local.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise UsageError(f"--base-model {text}: no such local folder, and not a Hub repo id (ORG/NAME)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"--base-model {text}: cannot fetch it from the Hub ({first_line}); pass a local folder instead"
        ) from e


def read_trainer_state(folder: Path) -> dict | None:
    """The few facts worth reporting from a checkpoint's `trainer_state.json`, or None if there is none."""
    path = folder / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    return {key: state.get(key) for key in ("global_step", "max_steps", "save_steps", "num_train_epochs")}


def _steps_text(steps, limit: int = 12) -> str:
    steps = sorted(steps)
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > limit else "")
