"""Sweeps: many schedule configs computed in one read of the checkpoints.

A sweep is a list of `(name, BEMASchedule)` pairs; `average(schedule=...)` writes one folder per config,
`OUTPUT/NAME/`. Two ways to write one down:

- a grid, the Cartesian product of values per field: `["ema_power=0.3,0.5,0.7", "bias_power=0.1,0.2"]`;
- a file (YAML or JSON) with a list of configs, each a mapping of `BEMASchedule` fields and an optional `name`,
  or a mapping from names to such mappings.

Fields not given keep the base schedule's values (the command line's). A config without a name is named after
the fields that set it, in order: `ema_power=0.3,bias_power=0.1`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import DataError, UsageError
from .schedule import BEMASchedule

FIELDS = {field.name: field.type for field in dataclasses.fields(BEMASchedule)}
_INTS = {"update_freq", "update_after"}
_STRINGS = {"convention"}


def config_name(params: dict[str, object]) -> str:
    """The folder name of a config: its parameters in order, `ema_power=0.3,bias_power=0.1`."""
    return ",".join(f"{key}={_text(value)}" for key, value in params.items())


def _text(value: object) -> str:
    """A value as written by hand: 0.3, 10 (not 10.0), 0.0001."""
    text = repr(value) if isinstance(value, float) else str(value)
    return text[:-2] if text.endswith(".0") else text


def _value(field: str, text: object, where: str) -> object:
    if field not in FIELDS:
        raise UsageError(f"{where}: unknown schedule field {field!r}; choose from {', '.join(FIELDS)}")
    if field in _STRINGS:
        return str(text)
    try:
        if field in _INTS:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(text)
        if isinstance(text, bool):
            raise ValueError
        return float(text)
    except (TypeError, ValueError):
        kind = "an integer" if field in _INTS else "a number"
        raise UsageError(f"{where}: {field} must be {kind}, got {text!r}") from None


def parse_grid(specs: Iterable[str], base: BEMASchedule = BEMASchedule()) -> list[tuple[str, BEMASchedule]]:
    """The configs of a grid: every combination of the values given per field.

    Args:
        specs (`Iterable[str]`): `FIELD=V1,V2,...` items (several may share one string, separated by spaces).
        base (`BEMASchedule`, defaults to TRL's defaults): values of the fields the grid does not name.

    Returns:
        `list[tuple[str, BEMASchedule]]`: named configs, the first field varying slowest.

    Example:

    ```python
    >>> [name for name, _ in parse_grid(["ema_power=0.3,0.5", "bias_power=0.1,0.2"])]
    ['ema_power=0.3,bias_power=0.1', 'ema_power=0.3,bias_power=0.2', 'ema_power=0.5,bias_power=0.1', 'ema_power=0.5,bias_power=0.2']
    ```
    """
    axes: dict[str, list[object]] = {}
    for item in (part for spec in specs for part in spec.split()):
        field, sep, values = item.partition("=")
        where = f"--grid {item}"
        if not sep or not values.strip(","):
            raise UsageError(f"{where}: write FIELD=V1,V2,... e.g. ema_power=0.3,0.5")
        if field in axes:
            raise UsageError(f"{where}: {field} is given twice; list all its values once")
        parsed = [_value(field, text, where) for text in values.split(",") if text.strip()]
        axes[field] = list(dict.fromkeys(parsed))
    if not axes:
        raise UsageError("--grid: give at least one FIELD=V1,V2,... item")
    configs = []
    for combination in itertools.product(*axes.values()):
        params = dict(zip(axes, combination))
        configs.append((config_name(params), _schedule(base, params, f"--grid {config_name(params)}")))
    return check_names(configs, source="--grid")


def load_sweep(path: str | Path, base: BEMASchedule = BEMASchedule()) -> list[tuple[str, BEMASchedule]]:
    """The configs of a sweep file (`.yaml`, `.yml` or `.json`).

    Example file:

    ```yaml
    - name: slow
      ema_power: 0.3
    - ema_power: 0.7
      bias_power: 0.1   # named ema_power=0.7,bias_power=0.1
    ```
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--sweep {path}: cannot read it ({e.strerror or e})") from e
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"--sweep {path}: malformed {path.suffix.lstrip('.') or 'YAML'} ({first_line})") from e
    if isinstance(data, dict):
        entries = [{**(params or {}), "name": name} if isinstance(params, dict) or params is None else params for name, params in data.items()]
    elif isinstance(data, list):
        entries = data
    else:
        raise DataError(f"--sweep {path}: expected a list of configs (or a mapping of names to configs)")
    if not entries:
        raise DataError(f"--sweep {path}: no configs in it")
    configs = []
    for number, entry in enumerate(entries, 1):
        where = f"--sweep {path}, config {number}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping of schedule fields, got {entry!r}")
        params = {key: _value(str(key), value, where) for key, value in entry.items() if key != "name"}
        name = str(entry["name"]) if entry.get("name") is not None else config_name(params)
        configs.append((name or "default", _schedule(base, params, where)))
    return check_names(configs, source=f"--sweep {path}")


def check_names(configs: Sequence[tuple[str, BEMASchedule]], *, source: str) -> list[tuple[str, BEMASchedule]]:
    """Config names must be distinct and usable as one folder name each."""
    seen = set()
    for name, _ in configs:
        if name in seen:
            raise UsageError(f"{source}: two configs are named {name!r}; names must be distinct")
        if "/" in name or "\\" in name or name.startswith(".") or not name.strip():
            raise UsageError(f"{source}: config name {name!r} cannot be a folder name (no '/', no leading '.')")
        seen.add(name)
    return list(configs)


def _schedule(base: BEMASchedule, params: dict[str, object], where: str) -> BEMASchedule:
    try:
        return base.replace(**params)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
