"""The checkpoints of a round being trained: which are complete, which one a killed round resumes from, and keeping
the optimizer state in the newest one only.

The Trainer writes a checkpoint's files in order and `trainer_state.json` last, so a checkpoint is complete when
that file reads back whole (with the model's weights, or a LoRA round's adapter, beside it). Resuming needs the
optimizer, scheduler and RNG state of one checkpoint, the newest; the others keep only what the averages read (the
model files or the adapter), which saves one optimizer state per checkpoint on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..sources.peft import ADAPTER_CONFIG, ADAPTER_SAFETENSORS
from ..sources.run import find_checkpoints

# What the Trainer writes to resume (besides trainer_state.json): removed from all but the newest checkpoint.
RESUME_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
RESUME_STATE_PREFIX = "rng_state"


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether the Trainer finished writing a checkpoint: `trainer_state.json`, written last, reads back whole."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = ("model.safetensors", "model.safetensors.index.json", ADAPTER_SAFETENSORS)
    return isinstance(state, dict) and "global_step" in state and any((folder / name).is_file() for name in weights)


def adapter_fingerprint(folder: Path) -> str:
    """sha256 of a LoRA checkpoint's adapter: its `adapter_config.json` and `adapter_model.safetensors`, byte for
    byte (the weights it stands for are a merge onto its base model; `output.fingerprint` fingerprints those)."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_SAFETENSORS):
        digest.update(f"{name}\n".encode())
        with open(folder / name, "rb") as f:
            while chunk := f.read(2**24):
                digest.update(chunk)
    return digest.hexdigest()


def has_resume_state(folder: Path) -> bool:
    return (folder / "optimizer.pt").is_file() and (folder / "scheduler.pt").is_file() and any(folder.glob(f"{RESUME_STATE_PREFIX}*"))


def prepare_resume(run_dir: Path) -> Path | None:
    """Where a killed round goes on from: its newest complete checkpoint with the state to resume, or None.

    Checkpoint folders the Trainer did not finish writing are removed (they would be written again). Without a
    checkpoint to resume from, the round's folder is removed, to start the round afresh.
    """
    if not run_dir.is_dir():
        return None
    steps = find_checkpoints(run_dir) if any(run_dir.glob("checkpoint-*")) else {}
    resumable = [step for step, folder in steps.items() if is_complete_checkpoint(folder) and has_resume_state(folder)]
    if not resumable:
        shutil.rmtree(run_dir)
        return None
    newest = max(resumable)
    for step, folder in steps.items():
        if step > newest or not is_complete_checkpoint(folder):
            shutil.rmtree(folder)
    return steps[newest]


def prune_resume_state(run_dir: Path, *, newest: int) -> None:
    """Remove the optimizer, scheduler and RNG state from every checkpoint before step `newest` (the model files,
    which the average reads, stay)."""
    for step, folder in find_checkpoints(run_dir).items():
        if step >= newest:
            continue
        for path in folder.iterdir():
            if path.name in RESUME_STATE_FILES or path.name.startswith(RESUME_STATE_PREFIX):
                path.unlink()


def resume_state_pruner():
    """A TrainerCallback that calls `prune_resume_state` once each checkpoint is complete."""
    from transformers import TrainerCallback

    class KeepResumeStateInNewest(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                prune_resume_state(Path(args.output_dir), newest=state.global_step)

    return KeepResumeStateInNewest()
