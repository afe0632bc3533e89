"""What evaluation reads from an output's provenance record (`bema_offline.json`), in one place.

The record grows as methods and readers are added; this accessor reads the fields evaluation needs and ignores the
rest, so an unknown field, or a missing optional one, never breaks `eval`. See `bema_offline.output.card.provenance`
for what `bema-average` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..output.card import PROVENANCE_FILE
from ..sources.run import BASE_STEP

_PARAMETER_KEYS = ("method_params", "params", "parameters")


@dataclass(frozen=True)
class OutputRecord:
    """The parts of a provenance record that evaluation uses.

    Args:
        folder (`Path`): the output folder the record describes.
        raw (`dict`): the whole record, as read.
    """

    folder: Path
    raw: dict

    @property
    def config(self) -> str | None:
        """The sweep config's name (`ema_power=0.3,bias_power=0.1`), if the output is one of a sweep's."""
        config = self.raw.get("config")
        return str(config) if config else None

    @property
    def method(self) -> str:
        """The averaging method: the record's `method` (a name, or a mapping with one), else its kind (bema, ema)."""
        method = self.raw.get("method")
        if isinstance(method, dict):
            method = method.get("name") or method.get("method")
        return str(method or self.raw.get("kind") or "average")

    @property
    def step(self) -> int | None:
        step = self.raw.get("step")
        return step if isinstance(step, int) else None

    @property
    def params(self) -> dict[str, object]:
        """The method's parameters: from `method` when it is a mapping, else `method_params` / `params` /
        `parameters`, else the BEMA `schedule`. Only scalar values (numbers, strings, booleans) are kept."""
        method = self.raw.get("method")
        found = None
        if isinstance(method, dict):
            found = {key: value for key, value in method.items() if key not in ("name", "method")}
        for key in _PARAMETER_KEYS:
            if not found and isinstance(self.raw.get(key), dict):
                found = self.raw[key]
        if not found and isinstance(self.raw.get("schedule"), dict):
            found = self.raw["schedule"]
        return {str(key): value for key, value in (found or {}).items() if isinstance(value, (int, float, str, bool))}

    @property
    def effective_weights(self) -> dict[int, float]:
        """Source step (0: the base model) → effective weight."""
        weights = {}
        for entry in self.raw.get("effective_weights") or []:
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and isinstance(entry.get("weight"), (int, float)):
                weights[entry["step"]] = float(entry["weight"])
        return weights

    @property
    def input_folders(self) -> dict[int, Path]:
        """Source step → the folder it was read from."""
        folders = {}
        for entry in self.raw.get("inputs") or []:
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry.get("folder"):
                folders[entry["step"]] = Path(entry["folder"])
        return folders

    @property
    def run_dir(self) -> Path | None:
        run_dir = self.raw.get("run_dir")
        return Path(run_dir) if run_dir else None

    @property
    def base_model(self) -> str | None:
        """The base model: the folder it was read from (absolute), else as given to bema-average (a Hub id, or a path
        that may be relative to where bema-average ran)."""
        folder = self.input_folders.get(BASE_STEP)
        if folder:
            return str(folder)
        base = self.raw.get("base_model")
        return str(base) if base else None

    @property
    def theta0(self) -> str | None:
        """θ0 of the schedule: `checkpoint-τ`'s folder when τ > 0, else the base model; None when not recorded."""
        steps = self.raw.get("steps") or {}
        step = steps.get("theta0") if isinstance(steps, dict) else None
        if step is None:
            return None
        if step == BASE_STEP:
            return self.base_model
        folder = self.input_folders.get(step) or (self.run_dir / f"checkpoint-{step}" if self.run_dir else None)
        return str(folder) if folder else None

    @property
    def last_checkpoint(self) -> tuple[int, Path] | None:
        """The newest checkpoint of the run (step and folder), whether or not the average used it."""
        steps = self.raw.get("steps") or {}
        found = [s for s in (steps.get("found") or []) if isinstance(s, int) and s != BASE_STEP]
        if not found:
            return None
        step = max(found)
        folder = self.input_folders.get(step) or (self.run_dir / f"checkpoint-{step}" if self.run_dir else None)
        return (step, folder) if folder else None


def read_output_record(folder: str | Path) -> OutputRecord | None:
    """The provenance record of an output folder; None for a folder without one (any model folder).

    Raises:
        `DataError`: the record exists but is not a JSON object.
    """
    folder = Path(folder)
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); re-run bema-average for this output") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a bema-offline provenance record (a JSON object); re-run bema-average for this output")
    return OutputRecord(folder=folder, raw=raw)
