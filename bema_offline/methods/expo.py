"""ExPO, model extrapolation (Zheng et al. 2024, "Weak-to-Strong Extrapolation Expedites Alignment",
arXiv 2404.16792): θ_T + α·(θ_T − θ_ref), past the last checkpoint, away from a reference.

Its weights are 1 + α on the last checkpoint and −α on the reference: a negative weight for α > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import DataError, UsageError, steps_text
from .base import BASE_STEP, Method, checkpoint_steps, nonzero, number_text, require_int, require_number


@dataclass(frozen=True)
class ExPO(Method):
    """θ_T + α·(θ_T − θ_ref), T being the last checkpoint.

    Args:
        alpha (`float`): how far to extrapolate (the paper sweeps 0.1 to 0.5); 0 gives θ_T, a negative α
            interpolates towards θ_ref.
        ref_step (`int`, *optional*): θ_ref's checkpoint step; default: the base model (step 0).

    Example:

    ```python
    >>> ExPO(alpha=0.5).weights([100, 200], base=True)
    {0: -0.5, 200: 1.5}
    ```
    """

    alpha: float
    ref_step: int | None = None

    name: ClassVar[str] = "expo"

    def __post_init__(self) -> None:
        require_number("expo: alpha", self.alpha)
        if self.ref_step is not None:
            require_int("expo: ref_step", self.ref_step, minimum=0)

    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        steps = checkpoint_steps(steps)
        last = steps[-1]
        reference = BASE_STEP if self.ref_step is None else self.ref_step
        if reference == BASE_STEP and not base:
            raise UsageError(
                "expo extrapolates away from θ_ref, the base model unless --ref-step says otherwise: "
                "pass --base-model, or --ref-step with a checkpoint's step"
            )
        if reference != BASE_STEP and reference not in steps:
            raise DataError(f"expo: ref_step {reference} is not among the checkpoints (steps {steps_text(steps)})")
        if reference == last:
            raise DataError(f"expo: ref_step {reference} is the last checkpoint itself; choose an earlier one")
        return nonzero({reference: -self.alpha, last: 1 + self.alpha})

    def label(self) -> str:
        return f"expo-alpha{number_text(self.alpha)}" + (f"-ref{self.ref_step}" if self.ref_step is not None else "")

    def describe(self) -> str:
        reference = "the base model" if not self.ref_step else f"checkpoint-{self.ref_step}"
        return f"ExPO extrapolation, α {number_text(self.alpha)} away from {reference}"
