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


def _kept_after(betas: list[float]) -> list[float]:
    """For each update i, ∏_(j>i) (1 − β_j): how much of what the EMA holds after update i survives to the end. With
    it every weight is a product (O(updates), where running the recurrence on coefficient vectors is quadratic)."""
    kept, product = [0.0] * len(betas), 1.0
    for i in range(len(betas) - 1, -1, -1):
        kept[i] = product
        product *= 1 - betas[i]
    return kept


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
        betas = [self.schedule.beta(step) for step in update_steps]
        kept = _kept_after(betas)
        # EMA: θ_t's weight β_t·kept_t. EMA(EMA) takes the EMA after each update t with β_t·kept_t, and in that EMA
        # θ_u (u ≤ t) weighs β_u·∏_(u<v≤t)(1 − β_v): summed from the last update back, r_u = β_u·kept_u + (1 − β_(u+1))·r_(u+1).
        ema = [beta * k for beta, k in zip(betas, kept)]
        ema_of_ema, r = [0.0] * len(betas), 0.0
        for i in range(len(betas) - 1, -1, -1):
            r = betas[i] * kept[i] + ((1 - betas[i + 1]) * r if i + 1 < len(betas) else 0.0)
            ema_of_ema[i] = betas[i] * r
        # θ0: the EMA keeps ∏(1 − β) of it; EMA(EMA) that too, plus, from the EMA after update t (which held
        # ∏_(v≤t)(1 − β_v) of θ0), β_t·kept_t of it
        theta0_in_ema, theta0_in_ema_of_ema = 1.0, 0.0
        for beta, k in zip(betas, kept):
            theta0_in_ema *= 1 - beta
            theta0_in_ema_of_ema += beta * k * theta0_in_ema
        theta0_in_ema_of_ema += theta0_in_ema
        weights = {self.schedule.theta0_step: 2 * theta0_in_ema - theta0_in_ema_of_ema}
        weights.update({step: 2 * a - b for step, a, b in zip(update_steps, ema, ema_of_ema)})
        return nonzero(weights)

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
        betas = [self.schedule.beta(step) for step in update_steps]
        kept = _kept_after(betas)
        theta0 = self.schedule.theta0_step
        weights = {theta0: kept[0] * (1 - betas[0])}  # what the EMA keeps of its start
        for step, beta, k in zip(update_steps, betas, kept):
            alpha = self.schedule.alpha(step)
            if alpha == 1.0:
                raise UsageError(
                    f"ouema divides by 1 − α, and α is 1 at step {step} (bias_power {self.schedule.bias_power:g}); "
                    "choose bias_power > 0"
                )
            # θ'_t = (θ_t − α_t·θ0)/(1 − α_t) enters with β_t and keeps kept_t of it
            weights[step] = beta * k / (1 - alpha)
            weights[theta0] -= beta * k * alpha / (1 - alpha)
        return nonzero(weights)

    def describe(self) -> str:
        return f"OU-corrected EMA on the schedule of {self._convention()}"
