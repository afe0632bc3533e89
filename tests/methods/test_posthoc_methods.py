"""`ema --half-life`, `power-ema` and `expo`: weights against references written here from the published formulas."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bema_offline.errors import DataError, UsageError
from bema_offline.methods.expo import ExPO
from bema_offline.methods.posthoc import SIGMA_REL_MAX, HalfLifeEMA, PowerEMA, gamma_of_sigma_rel, sigma_rel_of_gamma

step_lists = st.lists(st.integers(1, 10**6), min_size=1, max_size=30, unique=True).map(sorted)


def one_hot_ema(steps: list[int], beta_at) -> dict[int, float]:
    """An EMA over the checkpoints, from the first, with `ema.lerp_(θ_t, β_t)` (β_t = beta_at(previous, t)), run on
    float64 one-hot vectors: the result is each checkpoint's weight."""
    eye = np.eye(len(steps))
    ema = eye[0].copy()
    for i in range(1, len(steps)):
        beta = beta_at(steps[i - 1], steps[i])
        ema = ema + beta * (eye[i] - ema)
    return {step: float(ema[i]) for i, step in enumerate(steps)}


def close(got: dict[int, float], want: dict[int, float], rel: float = 1e-9) -> bool:
    """Equal within `rel`, or within 1e-12 of the total for tiny weights (the recurrence computes those as 1 − β with
    β near 1: the reference loses their low bits, the closed forms do not)."""
    return all(got.get(k, 0.0) == pytest.approx(v, rel=rel, abs=1e-12) for k, v in want.items()) and set(got) <= set(want)


@settings(max_examples=60, deadline=None)
@given(steps=step_lists, half_life=st.floats(1, 1e5))
def test_half_life_ema_is_the_recurrence_with_a_gap_dependent_beta(steps, half_life):
    """β = 1 − 0.5^(Δt/h) at each checkpoint, Δt its gap to the one before (the issue's definition)."""
    got = HalfLifeEMA(half_life=half_life).weights(steps, base=True)
    want = one_hot_ema(steps, lambda previous, step: 1 - 0.5 ** ((step - previous) / half_life))
    assert close(got, want, rel=1e-9)
    assert 0 not in got  # the base model is never used
    assert math.fsum(got.values()) == pytest.approx(1, abs=1e-12)


def test_half_life_halves_the_weight_per_half_life_of_age():
    got = HalfLifeEMA(half_life=100).weights([100, 200, 300, 400, 600], base=False)
    assert got == pytest.approx({100: 1 / 32, 200: 1 / 32, 300: 1 / 16, 400: 1 / 8, 600: 3 / 4}, abs=1e-15)


# EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696,
# and their code (NVlabs/edm2, training/phema.py). σ_rel(γ) = √((γ+1)/((γ+2)²(γ+3))) (Eq. 123); γ from σ_rel is
# the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) (Eq. 126, Algorithm 2, `std_to_exp`); the
# power-function EMA is tracked with β = (1 − Δt/t)^(γ+1) (Eq. 127, `power_function_beta`), ema.lerp_(θ, 1 − β).


def edm2_std_to_exp(sigma_rel: float) -> float:
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.28])
def test_gamma_is_edm2s_std_to_exp(sigma_rel):
    gamma = gamma_of_sigma_rel(sigma_rel)
    assert gamma == pytest.approx(edm2_std_to_exp(sigma_rel), rel=1e-10)
    assert sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)


def test_the_papers_two_profiles():
    """EDM2 §3.1 (and Table 1's post-hoc EMAs) name σ_rel = 0.05 and 0.10 as γ ≈ 16.97 and 6.94."""
    assert round(gamma_of_sigma_rel(0.05), 2) == 16.97 and round(gamma_of_sigma_rel(0.10), 2) == 6.94


@settings(max_examples=60, deadline=None)
@given(steps=step_lists, sigma_rel=st.floats(0.02, 0.28))
def test_power_ema_is_edm2s_power_function_ema_run_over_the_checkpoints(steps, sigma_rel):
    """EDM2's update, `power_function_beta(std, t_next, t_delta)`, taken at each checkpoint with its gap."""
    gamma = edm2_std_to_exp(sigma_rel)
    got = PowerEMA(sigma_rel=sigma_rel).weights(steps, base=True)
    want = one_hot_ema(steps, lambda previous, step: 1 - (1 - (step - previous) / step) ** (gamma + 1))
    assert close(got, want, rel=1e-7)
    assert 0 not in got and math.fsum(got.values()) == pytest.approx(1, abs=1e-12)


def test_power_ema_on_dense_checkpoints_has_the_profiles_width():
    """With a checkpoint at every step, the weights sample the profile ∝ t^γ, whose standard deviation relative to
    the last step is σ_rel."""
    steps = list(range(1, 4001))
    for sigma_rel in (0.05, 0.1, 0.2):
        got = PowerEMA(sigma_rel=sigma_rel).weights(steps, base=False)
        t = np.array(list(got)) / steps[-1]
        w = np.array(list(got.values()))
        mean = np.sum(w * t)
        assert math.sqrt(np.sum(w * (t - mean) ** 2)) == pytest.approx(sigma_rel, rel=2e-3)
        gamma = gamma_of_sigma_rel(sigma_rel)
        assert got[2000] == pytest.approx((gamma + 1) * (1999.5 / 4000) ** gamma / 4000, rel=1e-6)  # its density


def test_power_ema_refuses_widths_no_power_profile_has():
    assert SIGMA_REL_MAX == pytest.approx(0.300283, abs=1e-6)
    for bad in (0.0, -0.1, 0.31, float("nan"), float("inf"), 1e-200, 9e-7):
        with pytest.raises(UsageError, match="sigma_rel must"):
            PowerEMA(sigma_rel=bad)
    assert PowerEMA(sigma_rel=SIGMA_REL_MAX).gamma == pytest.approx((math.sqrt(5) - 3) / 2, abs=1e-6)


def test_expo_extrapolates_with_a_negative_weight():
    """ExPO (Zheng et al. 2024, arXiv 2404.16792): θ_T + α(θ_T − θ_ref) = (1 + α)·θ_T − α·θ_ref."""
    assert ExPO(alpha=0.3).weights([100, 200], base=True) == {0: -0.3, 200: 1.3}
    assert ExPO(alpha=0.5, ref_step=100).weights([100, 200, 300], base=False) == {100: -0.5, 300: 1.5}
    assert ExPO(alpha=-0.25, ref_step=100).weights([100, 300], base=False) == {100: 0.25, 300: 0.75}  # interpolation
    assert ExPO(alpha=0.0).weights([100, 200], base=True) == {200: 1.0}
    with pytest.raises(UsageError, match="pass --base-model, or --ref-step"):
        ExPO(alpha=0.3).weights([100, 200], base=False)
    with pytest.raises(DataError, match=r"ref_step 150 is not among the checkpoints \(steps 100, 200\)"):
        ExPO(alpha=0.3, ref_step=150).weights([100, 200], base=True)
    with pytest.raises(DataError, match="ref_step 200 is the last checkpoint itself"):
        ExPO(alpha=0.3, ref_step=200).weights([100, 200], base=True)
    with pytest.raises(UsageError, match="alpha must be a finite number"):
        ExPO(alpha=float("nan"))
