"""Find a run's `checkpoint-N/` folders and the base model, and describe their tensors (headers only).

Nothing here reads tensor data: a `WeightSource` maps each tensor name to where its bytes lie.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DataError, UsageError, first_line, steps_text
from ..files import read_json_file
from .dcp import DCP_FOLDER, load_dcp
from .deepspeed import is_deepspeed_folder, load_deepspeed
from .peft import ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, is_adapter_folder
from .runinfo import TRAINER_STATE_LIMIT
from .safetensors_io import INDEX_FILE, SINGLE_FILE, load_safetensors
from .tensors import BASE_STEP, TensorInfo, WeightSource
from .torch_bin import BIN_FILE, BIN_INDEX_FILE, load_torch_bin

__all__ = ["BASE_STEP", "INDEX_FILE", "SINGLE_FILE", "TensorInfo", "WeightSource", "find_checkpoints", "load_source"]

CHECKPOINT_NAME = re.compile(r"checkpoint-(.*)", re.DOTALL)
_STEP_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


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
        match = CHECKPOINT_NAME.fullmatch(entry)
        if not match:
            continue
        path = run_dir / entry
        if not _STEP_NUMBER.fullmatch(match.group(1)):
            raise DataError(f"{path}: checkpoint folder name without a step number; rename it checkpoint-<step> or move it away")
        if not path.is_dir():
            raise DataError(f"{path}: not a folder (a broken link or a link loop?); fix or remove it")
        step = int(match.group(1))
        if step == 0:  # step 0 is θ0, which is read from --base-model
            raise DataError(
                f"{path}: a checkpoint at step 0 is θ0, which bema-offline reads from --base-model: move it out of the run "
                "and pass it as --base-model"
            )
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
        bounds = " and ".join(f"{option} {value}" for option, value in (("--min-step", min_step), ("--max-step", max_step)) if value is not None)
        raise DataError(f"{run_dir}: no checkpoint within {bounds} (found steps {steps_text(found)})")
    return narrowed


def load_source(folder: Path, step: int) -> WeightSource:
    """Read the headers of one model folder, in whichever layout it was saved.

    The model's own weights come first, as transformers loads them: `model.safetensors` (or its shards), then
    `pytorch_model.bin` (or its shards); then the layouts that hold no consolidated weights: an FSDP sharded checkpoint
    (`pytorch_model_fsdp_0/`), then a DeepSpeed ZeRO checkpoint (`latest` and `global_stepN/`).

    Raises:
        `DataError`: no weights this tool can read (the message says what the folder holds and what to do), a
            PEFT adapter (its weights are a base model's plus its factors: `sources.peft` reads it), a missing
            shard, or a corrupt header.
    """
    if is_adapter_folder(folder):  # what a folder holds is what its config says, whatever else lies beside it
        raise DataError(
            f"{folder}: a PEFT adapter ({ADAPTER_CONFIG}), not a model's full weights; where a model is expected "
            "(--base-model, --ref-model), pass the model it was trained on"
        )
    if _present(folder / SINGLE_FILE) or _present(folder / INDEX_FILE):
        return load_safetensors(folder, step)
    if _present(folder / BIN_FILE) or _present(folder / BIN_INDEX_FILE):
        return load_torch_bin(folder, step)
    if _present(folder / DCP_FOLDER):
        return load_dcp(folder, step)
    if is_deepspeed_folder(folder):
        return load_deepspeed(folder, step)
    raise _no_weights_error(folder)


def _present(path: Path) -> bool:
    """Something is there, be it a broken link (which the reader then names)."""
    return path.exists() or path.is_symlink()


# Files every Trainer checkpoint may hold that are never model weights, whatever their extension.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json")


def _no_weights_error(folder: Path) -> DataError:
    """Say why a folder has no weights this tool can read."""
    try:
        names = os.listdir(folder) if folder.is_dir() else []
    except OSError as e:
        return DataError(f"{folder}: cannot list the folder ({e.strerror or e})")
    if ADAPTER_SAFETENSORS in names or ADAPTER_BIN in names:
        return DataError(f"{folder}: adapter weights without {ADAPTER_CONFIG}, an incomplete PEFT adapter checkpoint; restore its config")
    held = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
    state_only = bool(names) and all(n in NOT_WEIGHTS or n.startswith("rng_state") or n.endswith(".json") for n in names)
    hint = " (only training state and configs: was the model saved with it?)" if state_only else ""
    return DataError(
        f"{folder}: no {SINGLE_FILE}, {BIN_FILE}, {DCP_FOLDER}/ or DeepSpeed global_step*/, so no model weights; "
        f"it holds {held}{hint}"
    )


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
        raise DataError(
            f"--base-model {text}: cannot fetch it from the Hub ({first_line(e)}); pass a local folder instead"
        ) from e


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


def sidecar_origins(folders: list[Path]) -> dict[str, Path]:
    """Where each sidecar file (config, generation config, tokenizer) comes from: the first folder that has it."""
    origins = {}
    for name in SIDECAR_FILES:
        origin = next((folder / name for folder in folders if (folder / name).is_file()), None)
        if origin is not None:
            origins[name] = origin
    return origins


DEFAULT_UPDATE_FREQ = 400  # TRL's


def run_cadence(run_dir: str | Path, *, min_step: int | None = None, max_step: int | None = None) -> tuple[int, str]:
    """The run's own checkpoint cadence, for `--update-freq` when none is given, and where it was read.

    The newest checkpoint's `trainer_state.json` gives the Trainer's `save_steps`, when every checkpoint but the newest
    (a run's final save) lies on a multiple of it (a run that saves by epoch records the unused default, 500); else
    the checkpoints' spacing, when it is even; else TRL's default (400).

    Raises:
        `DataError`: the run has no checkpoints (as `find_checkpoints`).
    """
    found = find_checkpoints(run_dir, min_step=min_step, max_step=max_step)
    newest = max(found)
    state = read_trainer_state(found[newest])
    save_steps = state.get("save_steps") if state else None
    steps = sorted(found)
    why = "no save_steps in trainer_state.json"
    if isinstance(save_steps, (int, float)) and not isinstance(save_steps, bool) and save_steps >= 1 and float(save_steps).is_integer():
        if all(step % int(save_steps) == 0 for step in steps[:-1]):
            return int(save_steps), f"the run's save_steps (trainer_state.json of checkpoint-{newest})"
        why = f"trainer_state.json's save_steps {int(save_steps)} does not fit them: saved by epoch?"
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if len(gaps) == 1:
        (gap,) = gaps
        return gap, f"the spacing of the {len(steps)} checkpoints ({why})"
    return DEFAULT_UPDATE_FREQ, f"TRL's default: the checkpoints are not evenly spaced ({why})"


def read_trainer_state(folder: Path) -> dict | None:
    """The few facts worth reporting from a checkpoint's `trainer_state.json`, or None if there is none."""
    path = folder / "trainer_state.json"
    if not path.exists():
        return None
    try:
        state = read_json_file(path, what="trainer state", hint="ignored", limit=TRAINER_STATE_LIMIT)
    except DataError:
        return None
    if not isinstance(state, dict):
        return None
    return {key: state.get(key) for key in ("global_step", "max_steps", "save_steps", "num_train_epochs")}
