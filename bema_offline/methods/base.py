"""What every averaging method has in common.

A method is a frozen dataclass of validated parameters. Its one computation, `weights`, takes the checkpoints'
steps (ascending, after `--min-step`/`--max-step`) and whether a base model (θ0, step 0) exists, and returns each
source's effective weight in float64, from scalars alone: no tensor is read. The same numbers explain an output
(`bema-offline weights`, `--dry-run`, the model card) and drive the engine, which computes Σ wᵢ·θᵢ.

`replayed` methods (TRL's `bema` and `ema`) are computed by the engine as TRL computes them, op for op, for bit
parity with `BEMACallback`; their weights explain them. Every other method is a weighted sum of its sources.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from ..errors import DataError, UsageError

BASE_STEP = 0  # the model before training


class Method(ABC):
    """An averaging method. Subclasses are frozen dataclasses whose fields are the method's parameters.

    Class attributes:
        name (`str`): what `--method` and `method:` say.
        replayed (`bool`): computed by replaying TRL's recurrence rather than as a weighted sum.
    """

    name: ClassVar[str]
    replayed: ClassVar[bool] = False

    @abstractmethod
    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        """Each source's effective weight, in float64: `{step: weight}`, 0 being the base model.

        The weights sum to 1 (every method here is an affine combination); some may be negative. Sources with no
        weight are left out. The output's step is the newest source, `max(weights)`.

        Args:
            steps (`Sequence[int]`): the checkpoints' steps, ascending, after `--min-step` and `--max-step`.
            base (`bool`): whether a base model (the weights before training, step 0) is available.
            allow_missing (`bool`, defaults to False): for TRL's schedule, skip update steps without a checkpoint
                instead of failing.

        Raises:
            `UsageError` or `DataError`: one line, when the method cannot be computed from these sources (a base
                model is needed but not given, a window holds no checkpoint, ...).
        """

    @abstractmethod
    def label(self) -> str:
        """A short, stable folder name for sweeps: `uniform-last4`, `power-ema-sigma0.05`, ..."""

    @abstractmethod
    def describe(self) -> str:
        """One line for people: `uniform average of the last 4 checkpoints`."""

    def params(self) -> dict[str, object]:
        """The method's own parameters, as JSON values."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, object]:
        """`{"method": name, **parameters}`: what a sweep file entry, the provenance record and `verify` hold;
        `from_dict` reads it back."""
        return {"method": self.name, **self.params()}

    @classmethod
    def from_dict(cls, data: dict[str, object], *, where: str = "a method record") -> Method:
        """The method a `to_dict()` describes (any method, whichever class this is called on; one-line UsageError
        for a record no method can take)."""
        from .registry import method_from_dict

        return method_from_dict(data, where=where)


# --- helpers shared by the methods ------------------------------------------------------------------------------


def checkpoint_steps(steps: Sequence[int]) -> list[int]:
    """The steps as a sorted list of distinct positive ints; a DataError when there are none."""
    steps = sorted(set(steps))
    if not steps:
        raise DataError("no checkpoints to average")
    if steps[0] <= BASE_STEP:
        raise DataError(f"checkpoint-{steps[0]} cannot be told apart from the base model (step 0); rename or move it")
    return steps


def require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def require_number(name: str, value: object, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise UsageError(f"{name} must be > 0, got {value!r}")


def number_text(value: float) -> str:
    """A number as written by hand, for labels: 0.3, 200 (not 200.0), 0.0001, 1e-05."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def nonzero(weights: dict[int, float]) -> dict[int, float]:
    """The weights without the sources that get exactly nothing (the engine need not read them)."""
    return {step: weight for step, weight in weights.items() if weight != 0.0}
