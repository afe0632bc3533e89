"""Every method by name, and the one way to build one from loose parameters (command line, grid, sweep file,
provenance record).

Parameters are flat: a method's own (`last`, `window`, `half_life`, `sigma_rel`, `decay`, `alpha`, `ref_step`)
and, for the methods on TRL's schedule, the `BEMASchedule` fields (`update_freq`, `ema_power`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from .base import Method
from .expo import ExPO
from .posthoc import HalfLifeEMA, PowerEMA
from .replay import BEMA, EMA, ScheduleMethod
from .schedule import BEMASchedule
from .stabilizers import DEMA, OUEMA
from .windows import WSM, Uniform, parse_window

METHODS: dict[str, str] = {
    "bema": "Bias-Corrected EMA, TRL's BEMACallback replayed (default)",
    "ema": "TRL's EMA replayed; with --half-life, a fixed half-life EMA of the checkpoints",
    "dema": "2·EMA − EMA(EMA) on the same schedule",
    "ouema": "the BEMA paper's OU-corrected EMA on the same schedule",
    "uniform": "the plain average of a window of checkpoints",
    "power-ema": "EDM2's power-function EMA profile (--sigma-rel)",
    "wsm": "WSM's merge weights from a learning-rate decay shape (--decay)",
    "expo": "ExPO extrapolation θ_T + α(θ_T − θ_ref) (--alpha; negative weights)",
}

SCHEDULE_FIELDS = tuple(field.name for field in dataclasses.fields(BEMASchedule))
_INT_FIELDS = {"update_freq", "update_after", "last", "ref_step"}
_TEXT_FIELDS = {"convention", "decay", "method"}
_OWN_FIELDS = {  # each method's parameters, beside the schedule's for the methods on TRL's schedule
    "bema": (),
    "dema": (),
    "ouema": (),
    "uniform": ("last", "window"),
    "wsm": ("decay", "last", "window"),
    "power-ema": ("sigma_rel",),
    "expo": ("alpha", "ref_step"),
}
_CLASSES: dict[str, type[Method]] = {
    "bema": BEMA,
    "dema": DEMA,
    "ouema": OUEMA,
    "uniform": Uniform,
    "wsm": WSM,
    "power-ema": PowerEMA,
    "expo": ExPO,
}
_REQUIRED = {"power-ema": "sigma_rel", "expo": "alpha", "wsm": "decay"}
METHOD_FIELDS = ("last", "window", "half_life", "sigma_rel", "decay", "alpha", "ref_step")
FIELDS = ("method", *METHOD_FIELDS, *SCHEDULE_FIELDS)


def uses_schedule(name: str, params: Mapping[str, object] = {}) -> bool:
    """Whether the method `name` (with these parameters) runs on TRL's schedule options."""
    return name in ("bema", "dema", "ouema") or (name == "ema" and params.get("half_life") is None)


def applicable_fields(name: str, params: Mapping[str, object] = {}) -> tuple[str, ...]:
    """The parameters that method `name` takes (`ema` takes `half_life` and nothing else, or the schedule's)."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name == "ema":
        return ("half_life",) if params.get("half_life") is not None else ("half_life", *SCHEDULE_FIELDS)
    return (*_OWN_FIELDS[name], *(SCHEDULE_FIELDS if uses_schedule(name) else ()))


def make_method(name: str, params: Mapping[str, object], *, schedule: BEMASchedule = BEMASchedule(), where: str = "") -> Method:
    """Build method `name` from its parameters; schedule fields among them override `schedule`.

    Args:
        name (`str`): one of `METHODS`.
        params (`Mapping[str, object]`): typed parameters (see `parse_value`); None means not given. A parameter
            that the method does not take is refused.
        schedule (`BEMASchedule`, defaults to TRL's defaults): the schedule of the methods that take one.
        where (`str`, defaults to ""): what to name in messages, e.g. "--sweep s.yaml, config 3".

    Example:

    ```python
    >>> make_method("uniform", {"last": 4}).label()
    'uniform-last4'
    >>> make_method("ema", {"half_life": 200.0}).to_dict()
    {'method': 'ema', 'half_life': 200.0}
    ```
    """
    prefix = f"{where}: " if where else ""
    if name not in METHODS:
        raise UsageError(f"{prefix}unknown method {name!r}; choose from {', '.join(METHODS)}")
    given = {key: value for key, value in params.items() if value is not None}
    if isinstance(given.get("window"), int):  # `--window N`: the last N checkpoints
        if "last" in given:
            raise UsageError(f"{prefix}give --last or --window, not both")
        given["last"] = given.pop("window")
    allowed = applicable_fields(name, given)
    for key in given:
        if key not in allowed:
            raise UsageError(f"{prefix}{key} does not apply to {_method_words(name, given)}; {_takes(name, given)}")
    try:
        if uses_schedule(name, given):
            fields = {key: value for key, value in given.items() if key in SCHEDULE_FIELDS}
            return (EMA if name == "ema" else _CLASSES[name])(schedule.replace(**fields))
        if name == "ema":
            return HalfLifeEMA(**given)
        required = _REQUIRED.get(name)
        if required is not None and required not in given:
            raise UsageError(f"{name} needs {_option(required)}")
        return _CLASSES[name](**given)
    except UsageError as e:
        raise UsageError(f"{prefix}{e}") from None


def method_from_dict(data: Mapping[str, Any], *, where: str = "a method record") -> Method:
    """A method from its `to_dict()` (a provenance record, say). A record without `method` is a BEMASchedule's."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: expected a mapping of parameters, got {data!r}")
    name = data.get("method", "bema")
    params = {str(key): parse_value(str(key), value, where) for key, value in data.items() if key != "method" and value is not None}
    return make_method(str(name), params, where=where)


def parse_value(field: str, value: object, where: str) -> object:
    """A parameter's value from text (a grid) or a YAML/JSON value, typed: ints, finite floats, strings, a window.

    A bool is neither an int nor a number (YAML reads `yes` as true). A window given as one integer N is kept as
    the int N (the caller reads it as `last`).
    """
    if field not in FIELDS:
        raise UsageError(f"{where}: unknown field {field!r}; choose from {', '.join(FIELDS)}")
    kind = "an integer" if field in _INT_FIELDS else "text" if field in _TEXT_FIELDS else "a number"
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        if field in _TEXT_FIELDS:
            if not isinstance(value, str):
                raise ValueError
            return value.strip()
        if field == "window":
            if isinstance(value, int) or (isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()):
                return int(value)
            if not isinstance(value, str):
                raise ValueError
            try:
                return parse_window(value)
            except UsageError as e:
                raise UsageError(f"{where}: {e}, or N for the N newest checkpoints") from None
        if field in _INT_FIELDS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and not (value.strip().isascii() and value.strip().lstrip("+-").isdigit()):
                raise ValueError
            return int(value)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    except (TypeError, ValueError, OverflowError):
        wanted = "A:B steps or a number of checkpoints" if field == "window" else kind
        raise UsageError(f"{where}: {field} must be {wanted}, got {value!r}") from None


def _method_words(name: str, params: Mapping[str, object]) -> str:
    return "ema --half-life" if name == "ema" and params.get("half_life") is not None else name


def _takes(name: str, params: Mapping[str, object]) -> str:
    own = [field for field in applicable_fields(name, params) if field not in SCHEDULE_FIELDS]
    schedule = uses_schedule(name, params)
    if not own and not schedule:
        return f"{name} takes no options"
    parts = [", ".join(_option(field) for field in own)] if own else []
    parts += ["the schedule options"] if schedule else []
    return f"{_method_words(name, params)} takes {' and '.join(parts)}"


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


__all__ = [
    "FIELDS",
    "METHODS",
    "METHOD_FIELDS",
    "SCHEDULE_FIELDS",
    "ScheduleMethod",
    "applicable_fields",
    "make_method",
    "method_from_dict",
    "parse_value",
    "uses_schedule",
]
