"""Which models `bema-offline eval` compares: folders given, the outputs of a sweep, and the run's baselines.

A folder with a `config.json` is a model. Any other folder is a sweep output: every model folder under it is a
candidate (hidden folders are skipped, and so is a published `best/`, a copy of one of them), labelled by its path inside
the sweep, which for `--grid` is the config's name (`ema_power=0.3,bias_power=0.1`). `--baselines` adds the run's
base model and its newest checkpoint, read from the outputs' provenance records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, UsageError
from ..sources.runinfo import is_hub_id
from .record import OutputRecord, read_output_record

BEST_FOLDER = "best"
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Candidate:
    """One model to evaluate.

    Args:
        label (`str`): its name in tables and plots, unique.
        source (`str`): a model folder, or a Hub repo id (a baseline's base model may be one).
        role (`str`): "average" (a bema-offline output), "model" (any other folder) or "baseline".
        record (`OutputRecord`, *optional*): its provenance record, for an average.
    """

    label: str
    source: str
    role: str
    record: OutputRecord | None = None


@dataclass(frozen=True)
class Candidates:
    """What to evaluate, and where the report goes by default.

    Args:
        models (`list[Candidate]`): in the order given (a sweep's outputs sorted by path), baselines last.
        sweep_dir (`Path`, *optional*): the sweep folder, when exactly one was given and it is a bema-average output
            (where the report is written by default).
    """

    models: list[Candidate]
    sweep_dir: Path | None

    @property
    def records(self) -> list[OutputRecord]:
        return [c.record for c in self.models if c.record is not None]


def is_model_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def find_candidates(paths: Sequence[str | Path], *, baselines: bool = False) -> Candidates:
    """Resolve model folders and sweep folders into the models to evaluate.

    Args:
        paths (`Sequence[str | Path]`): model folders, or sweep folders whose model subfolders are evaluated.
        baselines (`bool`, defaults to False): also evaluate the run's base model and newest checkpoint, as the
            provenance records name them.

    Returns:
        `Candidates`: the models, checked to have a config and weights.

    Raises:
        `UsageError`: nothing given, `--baselines` without provenance. `DataError`: a missing folder, a folder
        without models, a model folder without weights.
    """
    if not paths:
        raise UsageError("give at least one model folder or sweep folder")
    found: list[tuple[Path, str | None]] = []  # (folder, its label inside a sweep)
    sweeps = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise DataError(f"{path}: no such folder; give model folders or a sweep folder written by bema-average")
        if is_model_folder(path):
            found.append((path, None))
            continue
        inside = _model_folders(path)
        if not inside:
            raise DataError(f"{path}: no model folder (with a {CONFIG_FILE}) in it or its subfolders")
        sweeps.append(path)
        found += [(folder, folder.relative_to(path).as_posix()) for folder in inside]
    models = []
    seen: set[Path] = set()
    for folder, label in found:
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        _check_weights(folder)
        record = read_output_record(folder)
        if label is not None and record is not None and "selection" in record.raw:
            continue  # a published best/: a copy of another output of the sweep
        role = "average" if record is not None else "model"
        models.append(Candidate(label or folder.name, str(folder), role, record))
    models = _unique_labels(models)
    # The report goes beside the models only in a bema-average output: never into a training run or other inputs
    own_sweep = len(sweeps) == 1 and len(paths) == 1 and all(model.role == "average" for model in models)
    if baselines:
        models += _baselines(models, seen)
    return Candidates(models=models, sweep_dir=sweeps[0] if own_sweep else None)


def _model_folders(root: Path) -> list[Path]:
    folders = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if here != root and CONFIG_FILE in files:
            folders.append(here)
            dirs[:] = []  # a model folder's subfolders are not models of the sweep
    return sorted(folders)


def _check_weights(folder: Path) -> None:
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise DataError(
            f"{folder}: {CONFIG_FILE} but no weights ({' or '.join(WEIGHT_FILES[:2])}); the folder is incomplete"
        )


def _unique_labels(models: list[Candidate]) -> list[Candidate]:
    """Labels given twice (runs/a/bema and runs/b/bema, or the same config in two sweeps) become the shortest tail of
    their resolved paths that tells them apart."""
    labels = [m.label for m in models]
    unique = []
    for model in models:
        label = model.label
        if labels.count(label) > 1:
            parts = Path(model.source).resolve().parts
            others = [Path(m.source).resolve().parts for m in models if m.label == label and m is not model]
            depth = next((d for d in range(2, len(parts) + 1) if all(o[-d:] != parts[-d:] for o in others)), len(parts))
            label = "/".join(parts[-depth:]).lstrip("/") or str(Path(model.source).resolve())
        unique.append(Candidate(label, model.source, model.role, model.record))
    return unique


def _baselines(models: list[Candidate], seen: set[Path]) -> list[Candidate]:
    records = [m.record for m in models if m.record is not None]
    if not records:
        raise UsageError(
            "--baselines reads the base model and the last checkpoint from the outputs' bema_offline.json, and none "
            "of the models given has one; pass those folders as models instead"
        )
    baselines = []
    bases = dict.fromkeys(r.base_model for r in records if r.base_model)
    lasts = dict.fromkeys(r.last_checkpoint for r in records if r.last_checkpoint)
    for base in bases:
        label = "base" if len(bases) == 1 else f"base ({base})"
        baselines.append(Candidate(label, base, "baseline"))
    for step, folder in lasts:
        baselines.append(Candidate(f"checkpoint-{step} (last)", str(folder), "baseline"))
    kept = []
    for baseline in baselines:
        if is_hub_id(baseline.source):  # loaded through the Hub cache, as bema-average read it
            kept.append(baseline)
            continue
        folder = Path(baseline.source)
        if not folder.is_dir():
            raise DataError(f"--baselines: {baseline.label} {folder} (from bema_offline.json) is no longer there; pass it as a model instead")
        if folder.resolve() not in seen:
            seen.add(folder.resolve())
            _check_weights(folder)
            kept.append(baseline)
    if not lasts:
        raise DataError("--baselines: the outputs' bema_offline.json name no checkpoint; re-run bema-average for them")
    return kept
