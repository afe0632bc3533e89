"""`bema`, `ema` (TRL's, replayed), `dema` and `ouema`: the weights of the methods on TRL's schedule options, against
float64 references written here from the methods' definitions (TRL's `BEMACallback` ops, abblock/bema's
`core_offline.py`), run on one-hot vectors: the output of a linear method applied to basis vectors is its weights."""

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bema_offline.errors import DataError, UsageError
from bema_offline.methods.registry import make_method
from bema_offline.methods.replay import BEMA, EMA
from bema_offline.methods.schedule import BEMASchedule, checked_update_steps
from bema_offline.methods.stabilizers import DEMA, OUEMA


def basis(sources: list[int]) -> dict[int, torch.Tensor]:
    """Source s as the float64 one-hot vector e_s."""
    eye = torch.eye(len(sources), dtype=torch.float64)
    return {source: eye[i] for i, source in enumerate(sources)}


def as_weights(vector: torch.Tensor, sources: list[int]) -> dict[int, float]:
    return {source: float(vector[i]) for i, source in enumerate(sources)}


def trl_factors(s: BEMASchedule, t: int) -> tuple[float, float]:
    """β and α as TRL's BEMACallback computes them (global step t), or as abblock/bema's offline code does."""
    if s.convention == "trl":
        x = s.lag + s.multiplier * t
        return max(x ** -s.ema_power, s.min_ema_multiplier), x ** -s.bias_power
    time_ = max(t - s.update_after + s.lag, 1)  # BaseStabilizer.get_ema_time / get_stabilizer_time
    return max((1 + s.multiplier * time_) ** -s.ema_power, s.min_ema_multiplier), (1 + time_) ** -s.bias_power


def close(got: dict[int, float], want: dict[int, float], tol: float = 1e-12) -> bool:
    keys = {k for k, v in got.items() if v != 0} | {k for k, v in want.items() if v != 0}
    return all(abs(got.get(k, 0.0) - want.get(k, 0.0)) <= tol * max(1.0, abs(want.get(k, 0.0))) for k in keys)


schedules = st.builds(
    BEMASchedule,
    update_freq=st.sampled_from([1, 2, 5]),
    ema_power=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
    bias_power=st.sampled_from([0.1, 0.2, 0.5]),
    lag=st.sampled_from([1.0, 10.0]),
    update_after=st.sampled_from([0, 0, 5]),
    multiplier=st.sampled_from([0.5, 1.0]),
    min_ema_multiplier=st.sampled_from([0.0, 1e-4, 0.2]),
    convention=st.sampled_from(["trl", "paper"]),
)


def run_steps(s: BEMASchedule, updates: int) -> list[int]:
    """Checkpoints at every step up to the `updates`-th update step of TRL's convention (the paper's convention
    updates at every one of them)."""
    return list(range(1, s.update_after + updates * s.update_freq + 1))


@settings(max_examples=60, deadline=None)
@given(s=schedules, updates=st.integers(1, 8))
def test_bema_and_ema_are_trls_ops_on_one_hot_vectors(s, updates):
    """TRL's `ema.mul_(1 - β).add_(θ_t, alpha=β)` and `bema = ema + α(θ_t − θ0)`, from θ0, at every update step."""
    steps = [t for t in run_steps(s, updates) if t == s.update_after or s.is_update_step(t) or t % 3 == 0]
    sources = sorted({0, *steps})
    theta = basis(sources)
    theta0 = theta[s.update_after]
    ema = theta0.clone()
    updates = [t for t in steps if s.is_update_step(t)]
    for t in updates:
        beta, alpha = trl_factors(s, t)
        ema.mul_(1 - beta).add_(theta[t], alpha=beta)
    bema = ema + alpha * (theta[updates[-1]] - theta0)
    assert close(BEMA(s).weights(steps, base=True), as_weights(bema, sources))
    assert close(EMA(s).weights(steps, base=True), as_weights(ema, sources))
    assert math.fsum(BEMA(s).weights(steps, base=True).values()) == pytest.approx(1, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(s=schedules, updates=st.integers(1, 8))
def test_dema_is_abblocks_double_ema_on_one_hot_vectors(s, updates):
    """abblock/bema `DEMA.update`: the single EMA takes θ_t, then the double EMA takes the updated single EMA, both
    with the same β; the output is 2·single − double. Both start at θ0."""
    steps = [t for t in run_steps(s, updates) if t == s.update_after or s.is_update_step(t) or t % 3 == 0]
    sources = sorted({0, *steps})
    theta = basis(sources)
    single, double = theta[s.update_after].clone(), theta[s.update_after].clone()
    for t in (t for t in steps if s.is_update_step(t)):
        beta, _ = trl_factors(s, t)
        single = single * (1 - beta) + theta[t] * beta  # BaseStabilizer._weight_update
        double = double * (1 - beta) + single * beta
    got = DEMA(s).weights(steps, base=True)
    assert close(got, as_weights(2.0 * single - 1.0 * double, sources))
    assert math.fsum(got.values()) == pytest.approx(1, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(s=schedules, updates=st.integers(1, 8))
def test_ouema_is_abblocks_ou_corrected_ema_on_one_hot_vectors(s, updates):
    """abblock/bema `OUEMA.update` with their multipliers, `get_polynomial_multipliers`:
    mult_1 = 1/(1 − (1+s)^−η), mult_2 = ((1+s)^η − 1)^−1, θ'_t = mult_1·θ_t − mult_2·θ0, then the EMA of θ'_t.
    Their code uses the paper's clock; with TRL's convention the same formula takes α = (lag + γt)^−η for (1+s)^−η."""
    steps = [t for t in run_steps(s, updates) if t == s.update_after or s.is_update_step(t) or t % 3 == 0]
    sources = sorted({0, *steps})
    theta = basis(sources)
    theta0 = theta[s.update_after]
    ema = theta0.clone()
    for t in (t for t in steps if s.is_update_step(t)):
        beta, alpha = trl_factors(s, t)
        base = alpha ** (-1 / s.bias_power)  # 1 + s in their code (lag + γt in TRL's convention)
        mult_1 = 1 / (1 - base**-s.bias_power)
        mult_2 = (base**s.bias_power - 1) ** -1
        corrected = theta[t] * mult_1 + theta0 * -mult_2
        ema = ema * (1 - beta) + corrected * beta
    got = OUEMA(s).weights(steps, base=True)
    assert close(got, as_weights(ema, sources), tol=1e-9)
    assert math.fsum(got.values()) == pytest.approx(1, abs=1e-9)


def test_worked_numbers_of_the_design_notes():
    """DESIGN.md §2: with TRL's defaults, BEMA at step 1200."""
    w = BEMA(BEMASchedule()).weights([400, 800, 1200], base=True)
    assert {k: round(v, 6) for k, v in w.items()} == {0: 0.649052, 400: 0.046281, 800: 0.034126, 1200: 0.270541}


def test_dema_with_ema_power_zero_is_the_last_checkpoint():
    """β = 1: both EMAs are θ_T, so 2·EMA − EMA(EMA) = θ_T."""
    assert DEMA(BEMASchedule(update_freq=10, ema_power=0.0)).weights([10, 20, 30], base=True) == {30: 1.0}


def test_ouema_refuses_a_full_correction():
    with pytest.raises(UsageError, match="ouema divides by 1 − α, and α is 1 at step 10"):
        OUEMA(BEMASchedule(update_freq=10, bias_power=0.0)).weights([10, 20], base=True)


@pytest.mark.parametrize("method", [BEMA, EMA, DEMA, OUEMA])
def test_schedule_methods_say_why_they_cannot_be_computed(method):
    s = BEMASchedule(update_freq=10)
    with pytest.raises(UsageError, match="update_after is 0, so θ0 is the model before training: pass --base-model"):
        method(s).weights([10, 20], base=False)
    with pytest.raises(DataError, match="update_after is 15, so θ0 is checkpoint-15, which is not among"):
        method(s.replace(update_after=15)).weights([10, 20, 25], base=False)
    with pytest.raises(DataError, match=r"update steps 20 have no checkpoint.*apart, so try --update-freq 20;.* or pass --allow-missing"):
        method(s).weights([10, 30], base=True)
    assert max(method(s).weights([10, 30], base=True, allow_missing=True)) == 30
    with pytest.raises(DataError, match="no checkpoint falls on an update step"):
        method(s.replace(update_freq=100)).weights([10, 30], base=True)
    with pytest.raises(UsageError, match="at step 10 .*overflow"):
        method(BEMASchedule(update_freq=10, lag=0.5, multiplier=0, bias_power=2000)).weights([10], base=True)


def test_update_steps_are_found_in_o_checkpoints():
    """A stray checkpoint-1000000000000 must not build a range of 10^12 steps (issue 10)."""
    s = BEMASchedule(update_freq=10)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"update steps 30, 40, .* \(99999999997 in all\) have no checkpoint"):
        checked_update_steps(s, [10, 20, 10**12], base=True)
    found = checked_update_steps(s, [10, 20, 10**12], base=True, allow_missing=True)
    assert found.present == [10, 20, 10**12] and found.missing_count == 10**11 - 3 and found.missing[:2] == [30, 40]
    assert len(found.missing) == 100  # listed for the provenance; all are counted
    assert time.perf_counter() - started < 1


def test_replayed_methods_are_marked_and_keep_their_kind():
    s = BEMASchedule(update_freq=10)
    assert BEMA(s).replayed and EMA(s).replayed and not DEMA(s).replayed and not OUEMA(s).replayed
    assert (BEMA(s).kind, EMA(s).kind) == ("bema", "ema")
    assert BEMA(s).update_steps([5, 10, 20, 25], base=True) == [10, 20]
    assert make_method("bema", {"ema_power": 0.3}, schedule=s) == BEMA(s.replace(ema_power=0.3))
    assert BEMA(s).to_dict() == {"method": "bema", **s.to_dict()}
