"""The paper's other stabilizers (Block & Zhang, arXiv 2508.00180; abblock/bema `core_offline.py`), on the same
schedule options as BEMA: DEMA and the OU-corrected EMA. Both are weighted sums whose weights follow from the
schedule's β and α at each update step; `docs/methods.md` restates the formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import UsageError
from .base import nonzero
from .replay import ScheduleMethod


def _mix(target: dict[int, float], keep: float, other: dict[int, float], beta: float) -> dict[int, float]:
    """(1 − β)·target + β·other, on coefficient vectors (the EMA update, as TRL writes it: keep = 1 − β)."""
    mixed = {source: keep * weight for source, weight in target.items()}
    for source, weight in other.items():
        mixed[source] = mixed.get(source, 0.0) + beta * weight
    return mixed


@dataclass(frozen=True)
class DEMA(ScheduleMethod):
    """Double EMA, 2·EMA − EMA(EMA): both EMAs start at θ0 and take the schedule's β at every update step, the second
    one averaging the first after its update (as abblock/bema's `DEMA.update` does).

    Example:

    ```python
    >>> from bema_offline.methods.schedule import BEMASchedule
    >>> w = DEMA(BEMASchedule(update_freq=100)).weights([100, 200, 300], base=True)
    >>> round(sum(w.values()), 12)
    1.0
    ```
    """

    name: ClassVar[str] = "dema"

    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        update_steps = self.update_steps(steps, base=base, allow_missing=allow_missing)
        theta0 = self.schedule.theta0_step
        ema, ema_of_ema = {theta0: 1.0}, {theta0: 1.0}
        for step in update_steps:
            beta = self.schedule.beta(step)
            ema = _mix(ema, 1 - beta, {step: 1.0}, beta)
            ema_of_ema = _mix(ema_of_ema, 1 - beta, ema, beta)
        return nonzero(_mix(ema, 2.0, ema_of_ema, -1.0))

    def describe(self) -> str:
        return f"DEMA (2·EMA − EMA(EMA)) on the schedule of {self._convention()}"


@dataclass(frozen=True)
class OUEMA(ScheduleMethod):
    """The paper's OU-corrected EMA: each checkpoint is first debiased towards its long-run mean,
    θ'_t = (θ_t − α_t·θ0) / (1 − α_t), then averaged by the EMA, EMA ← (1 − β_t)·EMA + β_t·θ'_t, from θ0.

    With TRL's convention α_t = (lag + multiplier·t)^(−bias_power); with the paper's, their `(1 + time)^(−η)`.
    α_t = 1 (bias_power 0) makes the correction undefined.
    """

    name: ClassVar[str] = "ouema"

    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        update_steps = self.update_steps(steps, base=base, allow_missing=allow_missing)
        theta0 = self.schedule.theta0_step
        ema = {theta0: 1.0}
        for step in update_steps:
            alpha, beta = self.schedule.alpha(step), self.schedule.beta(step)
            if alpha == 1.0:
                raise UsageError(
                    f"ouema divides by 1 − α, and α is 1 at step {step} (bias_power {self.schedule.bias_power:g}); "
                    "choose bias_power > 0"
                )
            debiased = {step: 1 / (1 - alpha), theta0: -alpha / (1 - alpha)}
            ema = _mix(ema, 1 - beta, debiased, beta)
        return nonzero(ema)

    def describe(self) -> str:
        return f"OU-corrected EMA on the schedule of {self._convention()}"
