"""Every method through the registry: built from loose parameters, written and read back as a dict, weights that sum
to 1 on any run, one-line errors for parameters a method does not take."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bema_offline.errors import UsageError
from bema_offline.methods.base import Method
from bema_offline.methods.posthoc import HalfLifeEMA
from bema_offline.methods.registry import METHODS, applicable_fields, make_method, method_from_dict, parse_value
from bema_offline.methods.replay import EMA
from bema_offline.methods.schedule import BEMASchedule

SCHEDULE = BEMASchedule(update_freq=10)
EXAMPLES = [
    ("bema", {}),
    ("bema", {"convention": "paper", "ema_power": 0.3}),
    ("ema", {}),
    ("ema", {"half_life": 25.0}),
    ("dema", {"lag": 3.0}),
    ("ouema", {"update_after": 10}),
    ("uniform", {}),
    ("uniform", {"last": 3}),
    ("uniform", {"window": (20, 50)}),
    ("uniform", {"window": 2}),  # `--window N`: the last N
    ("power-ema", {"sigma_rel": 0.1}),
    ("wsm", {"decay": "1-sqrt", "last": 4}),
    ("wsm", {"decay": "cosine", "window": (None, 40)}),
    ("expo", {"alpha": 0.4}),
    ("expo", {"alpha": 0.4, "ref_step": 20}),
]


@pytest.mark.parametrize("name, params", EXAMPLES)
def test_every_method_round_trips_through_its_dict(name, params):
    method = make_method(name, params, schedule=SCHEDULE)
    record = json.loads(json.dumps(method.to_dict()))  # as a provenance file holds it
    assert record["method"] == name
    assert method_from_dict(record) == method == Method.from_dict(record)
    assert method.label() and "/" not in method.label() and method.describe()
    weights = method.weights([10, 20, 30, 40, 50], base=True)
    assert math.fsum(weights.values()) == pytest.approx(1, abs=1e-12)
    assert max(weights) == 50 or (name, params) == ("uniform", {"window": (20, 50)}) or name == "wsm" and "window" in params


def test_ema_is_trls_unless_given_a_half_life():
    assert make_method("ema", {}, schedule=SCHEDULE) == EMA(SCHEDULE)
    assert make_method("ema", {"half_life": 50.0}) == HalfLifeEMA(50.0)
    assert applicable_fields("ema", {"half_life": 50.0}) == ("half_life",)
    with pytest.raises(UsageError, match="ema_power does not apply to ema --half-life; ema --half-life takes --half-life"):
        make_method("ema", {"half_life": 50.0, "ema_power": 0.3})


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("bema", {"last": 4}, "last does not apply to bema; bema takes the schedule options"),
        ("uniform", {"ema_power": 0.3}, "ema_power does not apply to uniform; uniform takes --last, --window"),
        ("expo", {"sigma_rel": 0.1, "alpha": 1.0}, "sigma_rel does not apply to expo; expo takes --alpha, --ref-step"),
        ("power-ema", {}, "power-ema needs --sigma-rel"),
        ("expo", {}, "expo needs --alpha"),
        ("wsm", {"last": 4}, "wsm needs --decay"),
        ("uniform", {"last": 2, "window": 3}, "give --last or --window, not both"),
        ("mean", {}, "unknown method 'mean'; choose from bema, ema, dema"),
        ("dema", {"ema_power": -1.0}, "ema_power and bias_power must be >= 0"),
    ],
)
def test_bad_parameters_are_one_line_usage_errors(name, params, message):
    with pytest.raises(UsageError, match=message) as caught:
        make_method(name, params, schedule=SCHEDULE, where="--sweep s.yaml, config 2")
    assert str(caught.value).startswith("--sweep s.yaml, config 2: ") and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "field, value, parsed",
    [
        ("last", "4", 4),
        ("last", 4.0, 4),
        ("ref_step", "+20", 20),
        ("window", "100:200", (100, 200)),
        ("window", ":200", (None, 200)),
        ("window", "8", 8),
        ("window", 8, 8),
        ("sigma_rel", "0.05", 0.05),
        ("alpha", 1, 1.0),
        ("decay", " cosine ", "cosine"),
    ],
)
def test_values_are_typed(field, value, parsed):
    assert parse_value(field, value, "here") == parsed and type(parse_value(field, value, "here")) is type(parsed)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("update_freq", True, "update_freq must be an integer, got True"),  # YAML's `yes`
        ("ema_power", False, "ema_power must be a number"),
        ("last", 2.5, "last must be an integer"),
        ("last", "٣", "last must be an integer"),  # a non-ASCII digit
        ("alpha", "nan", "alpha must be a number"),
        ("alpha", float("inf"), "alpha must be a number"),
        ("window", [1, 2], "window must be A:B steps or a number of checkpoints"),
        ("decay", 3, "decay must be text"),
        ("lr", 3, "unknown field 'lr'"),
    ],
)
def test_bad_values_are_refused(field, value, message):
    with pytest.raises(UsageError, match=message):
        parse_value(field, value, "here")


def runs() -> st.SearchStrategy:
    return st.lists(st.integers(1, 400), min_size=2, max_size=25, unique=True).map(sorted)


configs = st.one_of(
    st.builds(lambda p, c: ("bema", {"ema_power": p, "update_freq": 1, "convention": c}), st.floats(0, 1), st.sampled_from(["trl", "paper"])),
    st.builds(lambda p: ("ema", {"ema_power": p, "update_freq": 1}), st.floats(0, 1)),
    st.builds(lambda p, b: ("dema", {"ema_power": p, "bias_power": b, "update_freq": 1}), st.floats(0, 1), st.floats(0.05, 1)),
    st.builds(lambda p, b: ("ouema", {"ema_power": p, "bias_power": b, "update_freq": 1}), st.floats(0, 1), st.floats(0.05, 1)),
    st.builds(lambda k: ("uniform", {"last": k}), st.integers(1, 2)),
    st.builds(lambda h: ("ema", {"half_life": h}), st.floats(0.5, 1e4)),
    st.builds(lambda s: ("power-ema", {"sigma_rel": s}), st.floats(0.01, 0.3)),
    st.builds(lambda d: ("wsm", {"decay": d}), st.sampled_from(["linear", "cosine", "1-sqrt"])),
    st.builds(lambda a: ("expo", {"alpha": a}), st.floats(-2, 2)),
)


@settings(max_examples=150, deadline=None)
@given(config=configs, steps=runs())
def test_every_methods_weights_sum_to_one(config, steps):
    """Every method here is an affine combination of its sources: its float64 weights sum to 1, on any run."""
    name, params = config
    method = make_method(name, params)
    weights = method.weights(steps, base=True, allow_missing=True)
    assert all(isinstance(step, int) and (step == 0 or step in steps) for step in weights)
    assert all(math.isfinite(w) for w in weights.values())
    assert math.fsum(weights.values()) == pytest.approx(1, abs=1e-9)


def test_the_registry_names_every_method():
    assert list(METHODS) == ["bema", "ema", "dema", "ouema", "uniform", "power-ema", "wsm", "expo"]
    for name, params in EXAMPLES:
        method = make_method(name, params, schedule=SCHEDULE)
        assert isinstance(method, Method) and method.name == name
        assert method.replayed == (name in ("bema", "ema") and "half_life" not in params)
