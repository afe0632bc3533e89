"""TRL's BEMA and EMA (`BEMACallback`), replayed: the engine runs TRL's ops in TRL's order, so that with fp32
checkpoints the output is TRL's `bema/` bit for bit. Their weights come from the same recurrence run on scalars
(`schedule.effective_weights`) and explain them.

`ScheduleMethod` is also the base of the methods that take the same schedule options (`dema`, `ouema`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import UsageError
from .base import Method
from .schedule import BEMASchedule, checked_update_steps, effective_weights


@dataclass(frozen=True)
class ScheduleMethod(Method):
    """A method driven by TRL's schedule options (`--update-freq`, `--ema-power`, ..., `--convention`).

    Args:
        schedule (`BEMASchedule`, defaults to TRL's defaults): the schedule.
    """

    schedule: BEMASchedule = BEMASchedule()

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, BEMASchedule):
            raise UsageError(f"{self.name}: schedule must be a BEMASchedule, got {self.schedule!r}")

    def params(self) -> dict[str, object]:
        return self.schedule.to_dict()

    def label(self) -> str:
        return self.name

    def update_steps(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> list[int]:
        """The schedule's update steps that have a checkpoint, in order; the last is the output's step. Raises a
        one-line error when the schedule cannot be computed from these sources (see `checked_update_steps`, which
        also says which update steps are missing)."""
        return checked_update_steps(self.schedule, steps, base=base, allow_missing=allow_missing).present

    def _convention(self) -> str:
        return "TRL's BEMACallback" if self.schedule.convention == "trl" else "the paper's offline code"


@dataclass(frozen=True)
class BEMA(ScheduleMethod):
    """Bias-Corrected EMA as TRL's `BEMACallback` computes it (Block & Zhang, arXiv 2508.00180), replayed.

    Example:

    ```python
    >>> w = BEMA(BEMASchedule()).weights([400, 800], base=True)
    >>> {step: round(weight, 6) for step, weight in w.items()}
    {0: 0.655211, 400: 0.047651, 800: 0.297137}
    ```
    """

    name: ClassVar[str] = "bema"
    replayed: ClassVar[bool] = True
    kind: ClassVar[str] = "bema"  # what the engine's replay writes: "bema" or "ema"

    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        update_steps = self.update_steps(steps, base=base, allow_missing=allow_missing)
        return effective_weights(self.schedule, update_steps, [update_steps[-1]], self.kind)[update_steps[-1]]

    def describe(self) -> str:
        return f"BEMA, replayed as {self._convention()} computes it"


@dataclass(frozen=True)
class EMA(BEMA):
    """The plain EMA of TRL's `BEMACallback` (α = 0: no bias correction), replayed."""

    name: ClassVar[str] = "ema"
    kind: ClassVar[str] = "ema"

    def describe(self) -> str:
        return f"EMA, replayed as {self._convention()} computes it"
