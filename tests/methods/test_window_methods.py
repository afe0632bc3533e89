"""`uniform` and `wsm`: weights over a window of checkpoints, against references written here."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bema_offline.errors import DataError, UsageError
from bema_offline.methods.windows import WSM, Uniform, parse_window

STEPS = [100, 200, 300, 400, 500, 600]

step_lists = st.lists(st.integers(1, 10**6), min_size=2, max_size=40, unique=True).map(sorted)


@pytest.mark.parametrize(
    "method, chosen",
    [
        (Uniform(), STEPS),
        (Uniform(last=1), [600]),
        (Uniform(last=4), [300, 400, 500, 600]),
        (Uniform(window=(200, 400)), [200, 300, 400]),
        (Uniform(window=(250, None)), [300, 400, 500, 600]),
        (Uniform(window=(None, 150)), [100]),
        (Uniform(window=parse_window("150:450")), [200, 300, 400]),
    ],
)
def test_uniform_is_one_over_k_exactly_on_the_right_steps(method, chosen):
    weights = method.weights(STEPS, base=True)
    assert list(weights) == chosen  # never the base model
    assert all(w == 1 / len(chosen) for w in weights.values())  # bit for bit, as the float64 1/K


@settings(max_examples=50, deadline=None)
@given(steps=step_lists, last=st.integers(1, 40))
def test_uniform_weights_sum_to_one(steps, last):
    weights = Uniform(last=min(last, len(steps))).weights(steps, base=False)
    assert math.fsum(weights.values()) == pytest.approx(1, abs=1e-12)


def test_windows_say_why_they_cannot_be_computed():
    with pytest.raises(DataError, match=r"uniform: last 7 checkpoints asked for, but there are 6 \(steps 100, 200"):
        Uniform(last=7).weights(STEPS, base=False)
    with pytest.raises(DataError, match="uniform: window 610:700 holds no checkpoint"):
        Uniform(window=(610, 700)).weights(STEPS, base=False)
    with pytest.raises(UsageError, match="window 500:400 is empty"):
        Uniform(window=(500, 400))
    with pytest.raises(UsageError, match="give last or window, not both"):
        Uniform(last=2, window=(1, 2))
    with pytest.raises(UsageError, match="last must be an integer >= 1, got 0"):
        Uniform(last=0)
    for text in ("5", "a:b", ":", "1:2:3", "1.5:3"):
        with pytest.raises(UsageError, match="write A:B"):
            parse_window(text)
    with pytest.raises(DataError, match="no checkpoints to average"):
        Uniform().weights([], base=True)
    with pytest.raises(DataError, match="wsm: the window holds one checkpoint"):
        WSM(decay="linear", window=(100, 150)).weights(STEPS, base=False)
    with pytest.raises(UsageError, match="wsm: last must be >= 2"):
        WSM(decay="linear", last=1)
    with pytest.raises(UsageError, match="wsm: decay must be one of linear, cosine, 1-sqrt, got 'exp'"):
        WSM(decay="exp")


DECAY_SHAPES = {  # the learning-rate multiplier f(x) on the window, x from 0 to 1 (WSM, arXiv 2507.17634, §3)
    "linear": lambda x: 1 - x,
    "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1 - math.sqrt(x),
}


def interval_mean(f, a: float, b: float, points: int = 4000) -> float:
    """The mean of f over [a, b], by the midpoint rule (an independent quadrature, not the antiderivatives)."""
    h = (b - a) / points
    return sum(f(a + (i + 0.5) * h) for i in range(points)) / points


@settings(max_examples=25, deadline=None)
@given(steps=st.lists(st.integers(1, 10**5), min_size=2, max_size=12, unique=True).map(sorted), decay=st.sampled_from(sorted(DECAY_SHAPES)))
def test_wsm_merge_weights_follow_the_papers_formula(steps, decay):
    """WSM's merge ↔ decay duality: θ̂ = Σ c_j θ_j equals training with the learning rate multiplied by
    w_i = Σ_(j≥i) c_j between checkpoints i−1 and i, so c_0 = 1 − w_1, c_j = w_j − w_(j+1), c_k = w_k. Here w_i is
    the decay shape's mean over that interval of the window (uneven spacing included)."""
    x = [(t - steps[0]) / (steps[-1] - steps[0]) for t in steps]
    w = [interval_mean(DECAY_SHAPES[decay], a, b) for a, b in zip(x, x[1:])]
    c = [1 - w[0]] + [w[i] - w[i + 1] for i in range(len(w) - 1)] + [w[-1]]
    got = WSM(decay=decay).weights(steps, base=True)
    assert list(got) == steps  # every checkpoint of the window has a weight (none is exactly 0), no base model
    assert [got[t] for t in steps] == pytest.approx(c, abs=1e-6)
    assert all(weight > 0 for weight in got.values())
    assert math.fsum(got.values()) == pytest.approx(1, abs=1e-12)


def test_wsm_linear_decay_on_even_spacing_is_the_trapezoidal_average():
    """A linear decay over k equal intervals: each interval's mean multiplier is 1 − (i − ½)/k, so the merge weights
    are ½k, 1/k, ..., 1/k, ½k (the trapezoidal rule over the window)."""
    got = WSM(decay="linear", last=5).weights(STEPS, base=False)
    assert list(got) == [200, 300, 400, 500, 600]
    assert [got[t] for t in got] == pytest.approx([1 / 8, 1 / 4, 1 / 4, 1 / 4, 1 / 8], abs=1e-15)


def test_wsm_weights_tend_to_the_decay_shape_on_dense_checkpoints():
    """With a checkpoint at every step, the learning-rate multiplier that the merge emulates, Σ_(j≥i) c_j, is the
    decay shape itself."""
    steps = list(range(1, 1002))
    for decay, shape in DECAY_SHAPES.items():
        got = WSM(decay=decay).weights(steps, base=False)
        c = [got.get(t, 0.0) for t in steps]
        for i in (100, 250, 500, 750, 1000):  # (near x = 0, 1 − √x is too steep for a midpoint value)
            tail = math.fsum(c[i:])
            assert tail == pytest.approx(shape((i - 0.5) / 1000), abs=1e-5), (decay, i)
