"""Post-hoc EMAs over the saved checkpoints, whatever their spacing: a fixed half-life EMA, and EDM2's power-function
EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696).

Both see the run only at its checkpoints: checkpoint i stands for the training steps since the one before it. Their
profiles are therefore sampled at the save interval, and the oldest checkpoint at hand stands for every step before
it. The finer the spacing relative to the profile's width (the half-life, or σ_rel × the last step), the closer the
weights follow the continuous profile. Neither method uses the base model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import UsageError
from .base import Method, checkpoint_steps, nonzero, number_text, require_number

_LN2 = math.log(2)


@dataclass(frozen=True)
class HalfLifeEMA(Method):
    """An EMA of the checkpoints with a fixed half-life in steps: from the oldest checkpoint at hand, each next one
    at a gap Δt is taken in with β = 1 − 0.5^(Δt/h), so that uneven spacing is handled. Checkpoint t ends with the
    weight 0.5^((T − t)/h)·(1 − 0.5^(Δt/h)), the oldest 0.5^((T − t_1)/h).

    Args:
        half_life (`float`): h, in training steps.

    Example:

    ```python
    >>> HalfLifeEMA(half_life=100).weights([100, 200, 300], base=False)
    {100: 0.25, 200: 0.25, 300: 0.5}
    ```
    """

    half_life: float

    name: ClassVar[str] = "ema"  # `--method ema --half-life H`; without a half-life, `ema` is TRL's, replayed

    def __post_init__(self) -> None:
        require_number("ema: half_life", self.half_life, positive=True)

    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        steps = checkpoint_steps(steps)
        last = steps[-1]
        decay = _LN2 / self.half_life
        weights = {steps[0]: math.exp(-(last - steps[0]) * decay)}
        for previous, step in zip(steps, steps[1:]):
            weights[step] = -math.expm1(-(step - previous) * decay) * math.exp(-(last - step) * decay)
        return nonzero(weights)

    def label(self) -> str:
        return f"ema-halflife{number_text(self.half_life)}"

    def describe(self) -> str:
        return f"EMA of the checkpoints with a half-life of {number_text(self.half_life)} steps"


def sigma_rel_of_gamma(gamma: float) -> float:
    """EDM2's relative standard deviation of the power profile t^γ (their Eq. 123): √((γ+1) / ((γ+2)²(γ+3)))."""
    return math.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


GAMMA_OF_WIDEST = (math.sqrt(5) - 3) / 2  # where σ_rel(γ) peaks: γ² + 3γ + 1 = 0
SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_OF_WIDEST)  # 0.30028...
SIGMA_REL_MIN = 1e-6  # γ ≈ 10¹²: the last checkpoint alone, to the last bit


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ of the power profile with relative width σ_rel: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0 (EDM2, Eq. 126 and Algorithm 2), found by Newton's method from
    above, where the cubic is increasing and convex, so the iterates decrease to the root.

    Example:

    ```python
    >>> round(gamma_of_sigma_rel(0.05), 4), round(gamma_of_sigma_rel(0.1), 4)
    (16.9722, 6.9372)
    ```
    """
    t = sigma_rel**-2
    gamma = 1 + max(7.0, abs(16 - t), abs(12 - t))  # above every root (Cauchy's bound)
    for _ in range(400):
        value = ((gamma + 7) * gamma + 16 - t) * gamma + 12 - t
        slope = (3 * gamma + 14) * gamma + 16 - t
        if value <= 0 or slope <= 0:
            break
        step = value / slope
        gamma -= step
        if step <= 4e-16 * max(1.0, abs(gamma)):
            break
    return max(gamma, GAMMA_OF_WIDEST)


@dataclass(frozen=True)
class PowerEMA(Method):
    """EDM2's power-function EMA, evaluated on the raw checkpoints: the profile ∝ t^γ over the run, γ given by σ_rel.

    EDM2 tracks it with β_t = (1 − Δt/t)^(γ+1) at each update (their Eq. 127); run over the checkpoints, from the
    first, that gives checkpoint t_i the weight (t_i^(γ+1) − t_(i−1)^(γ+1)) / T^(γ+1), with t_0 = 0: exactly the
    profile's mass over the steps since the checkpoint before.

    Args:
        sigma_rel (`float`): the profile's width relative to the last step, in [1e-6, 0.3003]; EDM2 uses 0.05 to
            0.2.
    """

    sigma_rel: float

    name: ClassVar[str] = "power-ema"

    def __post_init__(self) -> None:
        require_number("power-ema: sigma_rel", self.sigma_rel, positive=True)
        if not SIGMA_REL_MIN <= self.sigma_rel <= SIGMA_REL_MAX:
            raise UsageError(
                f"power-ema: sigma_rel must lie in [{SIGMA_REL_MIN:g}, {SIGMA_REL_MAX:.4f}] (the widest power profile), "
                f"got {self.sigma_rel!r}; EDM2 uses 0.05 to 0.2"
            )

    @property
    def gamma(self) -> float:
        return gamma_of_sigma_rel(self.sigma_rel)

    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        steps = checkpoint_steps(steps)
        power, last = self.gamma + 1, steps[-1]
        mass = [(step / last) ** power for step in steps]  # of the profile up to each checkpoint
        return nonzero(dict(zip(steps, [mass[0]] + [b - a for a, b in zip(mass, mass[1:])])))

    def label(self) -> str:
        return f"power-ema-sigma{number_text(self.sigma_rel)}"

    def describe(self) -> str:
        return f"power-function EMA (EDM2), σ_rel {number_text(self.sigma_rel)} (γ {self.gamma:.4g})"
