import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bema_offline import BEMASchedule, UsageError, effective_weights

# DESIGN.md §2, worked numbers with TRL's defaults.
WORKED = {
    400: (0.049386, 0.300222, {0: 0.650391, 400: 0.349609}),
    800: (0.035136, 0.262001, {0: 0.655211, 400: 0.047651, 800: 0.297137}),
    1200: (0.028748, 0.241793, {0: 0.649052, 400: 0.046281, 800: 0.034126, 1200: 0.270541}),
}


@pytest.mark.parametrize("step", sorted(WORKED))
def test_worked_numbers(step):
    beta, alpha, weights = WORKED[step]
    schedule = BEMASchedule()
    assert schedule.beta(step) == pytest.approx(beta, abs=5e-7)
    assert schedule.alpha(step) == pytest.approx(alpha, abs=5e-7)
    computed = effective_weights(schedule, [400, 800, 1200], [step])[step]
    assert computed.keys() == weights.keys()
    for source, weight in weights.items():
        assert computed[source] == pytest.approx(weight, abs=5e-7)
    assert math.fsum(computed.values()) == pytest.approx(1.0, abs=1e-12)


def test_factors_are_trl_float_arithmetic():
    s = BEMASchedule(lag=3, multiplier=0.5, ema_power=0.7, min_ema_multiplier=0.3)
    for step in (1, 7, 100):
        assert s.beta(step) == max((3 + 0.5 * step) ** -0.7, 0.3)
        assert s.alpha(step) == (3 + 0.5 * step) ** -0.2
    assert s.beta_is_clamped(100) and not s.beta_is_clamped(1)


def test_update_steps_use_global_step_after_burn_in():
    s = BEMASchedule(update_freq=3, update_after=2)
    assert s.theta0_step == 2
    assert s.update_steps(range(1, 12)) == [5, 8, 11]
    assert not s.is_update_step(2)  # step τ only takes the snapshot
    # the factors use the global step t, not t - τ
    assert s.beta(5) == (10 + 5) ** -0.5


def test_update_steps_run_to_last_available_step_even_if_missing():
    assert BEMASchedule(update_freq=400).update_steps([500, 1300]) == [400, 800, 1200]


def test_edge_values():
    s = BEMASchedule(ema_power=0.0, bias_power=0.0)
    assert s.beta(400) == 1.0 and s.alpha(400) == 1.0
    w = effective_weights(s, [400, 800], [800])[800]
    # κ = 0: the EMA is the last iterate; η = 0: full correction, θ800 + (θ800 − θ0)
    assert w == pytest.approx({0: -1.0, 400: 0.0, 800: 2.0})
    ema = effective_weights(BEMASchedule(), [400, 800], [800], kind="ema")[800]
    assert math.fsum(ema.values()) == pytest.approx(1.0)
    assert ema[800] == pytest.approx(BEMASchedule().beta(800))


def test_paper_convention_clock_and_every_checkpoint():
    s = BEMASchedule(convention="paper", update_after=100, lag=10, multiplier=1.0, min_ema_multiplier=1e-4)
    assert s.update_steps([100, 150, 400]) == [150, 400]
    time = max(150 - 100 + 10, 1)
    assert s.beta(150) == max((1 + time) ** -0.5, 1e-4)
    assert s.alpha(150) == (1 + time) ** -0.2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"update_freq": 0}, "update_freq"),
        ({"update_after": -1}, "update_after"),
        ({"ema_power": -0.5}, "ema_power"),
        ({"bias_power": -1.0}, "no-bias-correction"),
        ({"min_ema_multiplier": 2.0}, "min_ema_multiplier"),
        ({"lag": float("nan")}, "lag"),
        ({"convention": "foo"}, "convention"),
    ],
)
def test_invalid_parameters(kwargs, message):
    with pytest.raises(UsageError, match=message):
        BEMASchedule(**kwargs)


def test_non_positive_base_is_refused():
    s = BEMASchedule(lag=-500, update_freq=100)
    with pytest.raises(UsageError, match="step 100.*<= 0"):
        s.check_steps([100, 200])


@given(
    update_freq=st.integers(1, 50),
    update_after=st.integers(0, 50),
    ema_power=st.floats(0, 2),
    bias_power=st.floats(0, 2),
    lag=st.floats(0.5, 100),
    multiplier=st.floats(0.1, 4),
    min_ema=st.floats(0, 1),
    n=st.integers(1, 12),
    kind=st.sampled_from(["bema", "ema"]),
)
def test_effective_weights_sum_to_one(update_freq, update_after, ema_power, bias_power, lag, multiplier, min_ema, n, kind):
    s = BEMASchedule(update_freq, ema_power, bias_power, lag, update_after, multiplier, min_ema)
    steps = [update_after + k * update_freq for k in range(1, n + 1)]
    weights = effective_weights(s, steps, steps, kind)
    for step, w in weights.items():
        assert math.fsum(w.values()) == pytest.approx(1.0, abs=1e-9)
        assert max(w) == step
