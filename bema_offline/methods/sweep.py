"""Sweeps: many configs, possibly of different methods, computed in one read of the checkpoints.

A sweep is a list of `(name, Method)` pairs; each config gets one folder, `OUTPUT/NAME/`. Two ways to write one:

- a grid, the Cartesian product of values per field: `["method=bema,uniform", "last=4,8"]`. A field that does not
  apply to a method is left out of that method's configs (`uniform` takes `last`, `bema` does not), and configs that
  come out the same are kept once;
- a file (YAML or JSON) with a list of configs, each a mapping of fields (`method:`, its parameters, schedule fields)
  and an optional `name`, or a mapping from names to such mappings.

Fields not given keep the command line's values (`MethodOptions`): its method, its method options where the
config's method takes them, and its schedule. A config without a name is named after what it sets: the method's
short label when it sets the method or its parameters (`uniform-last4`), then the schedule fields it sets
(`ema_power=0.3,bias_power=0.1`).

Sweep files are untrusted input: they are read only if they are small regular files, YAML aliases are refused (a
"billion laughs" never expands), a bool is not a number, and every name must be a plain folder name.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, UsageError
from ..files import read_small_file
from ..safe_yaml import load_yaml
from .base import Method
from .registry import FIELDS, METHODS, SCHEDULE_FIELDS, applicable_fields, make_method, parse_value
from .replay import BEMA
from .schedule import BEMASchedule

MAX_SWEEP_BYTES = 1 << 20  # a sweep file is a few lines; anything larger is refused before it is read
MAX_CONFIGS = 1000  # configs in one sweep: each is an output folder, all computed in one pass
MAX_NAME_BYTES = 200  # a config name is a folder name (most file systems allow 255 bytes; some room is kept)
FILE_SUFFIXES = (".safetensors", ".json", ".md", ".png", ".svg", ".txt", ".model", ".jinja", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class MethodOptions:
    """What the command line says: the method, the method options given (None for those not given), and the
    schedule (TRL's options, used by the methods that take a schedule).

    Example:

    ```python
    >>> MethodOptions("uniform", {"last": 4}).build().label()
    'uniform-last4'
    ```
    """

    method: str = "bema"
    params: Mapping[str, object] = field(default_factory=dict)
    schedule: BEMASchedule = BEMASchedule()

    def build(self, where: str = "") -> Method:
        """The one method these options describe (no grid, no sweep)."""
        return make_method(self.method, self.params, schedule=self.schedule, where=where)

    def given(self) -> dict[str, object]:
        return {key: value for key, value in self.params.items() if value is not None}


def method_configs(
    options: MethodOptions = MethodOptions(), *, grid: Sequence[str] = (), sweep: str | Path | None = None
) -> list[tuple[str, Method]]:
    """The named configs of a command line: one config named "" without `grid` or `sweep`, else the sweep's.

    Raises:
        `UsageError`: bad options, or an option that applies to none of the configs; `DataError`: a bad sweep file.
    """
    if grid and sweep is not None:
        raise UsageError("--grid and --sweep exclude each other")
    if grid:
        return grid_configs(grid, options)
    if sweep is not None:
        return sweep_configs(sweep, options)
    return [("", options.build())]


def grid_configs(specs: Iterable[str], options: MethodOptions = MethodOptions()) -> list[tuple[str, Method]]:
    """The configs of a grid: every combination of the values given per field, the first field varying slowest.

    Args:
        specs (`Iterable[str]`): `FIELD=V1,V2,...` items (several may share one string, separated by spaces).
        options (`MethodOptions`, defaults to BEMA with TRL's defaults): the values of the fields the grid does not
            name.

    Example:

    ```python
    >>> [name for name, _ in grid_configs(["method=bema,uniform", "last=4,8"])]
    ['bema', 'uniform-last4', 'uniform-last8']
    ```
    """
    axes: dict[str, list[object]] = {}
    for item in (part for spec in specs for part in spec.split()):
        key, sep, values = item.partition("=")
        key = _field_name(key)
        where = f"--grid {item}"
        if not sep or not values.strip(","):
            raise UsageError(f"{where}: write FIELD=V1,V2,... e.g. ema_power=0.3,0.5")
        if key in axes:
            raise UsageError(f"{where}: {key} is given twice; list all its values once")
        parsed = [parse_value(key, text, where) for text in values.split(",") if text.strip()]
        axes[key] = list(dict.fromkeys(parsed))
    if not axes:
        raise UsageError("--grid: give at least one FIELD=V1,V2,... item")
    combinations = math.prod(len(values) for values in axes.values())
    if combinations > MAX_CONFIGS:
        raise UsageError(f"--grid: {combinations} combinations; one run takes at most {MAX_CONFIGS} configs")
    configs: dict[str, Method] = {}
    used: set[str] = set()
    for combination in itertools.product(*axes.values()):
        chosen = dict(zip(axes, combination))
        method = _known(str(chosen.pop("method", options.method)), "--grid method")
        own = {key: value for key, value in chosen.items() if key in applicable_fields(method, {**options.given(), **chosen})}
        used |= own.keys() | ({"method"} if "method" in axes else set())
        name, config = _config(method, own, options, where=f"--grid {_params_text(chosen, method)}", named="method" in axes)
        if name in configs and configs[name] != config:  # pragma: no cover - names follow from the fields
            raise UsageError(f"--grid: two configs are named {name!r}")
        configs.setdefault(name, config)
    unused = [key for key in axes if key not in used]
    if unused:
        raise UsageError(f"--grid: {unused[0]} applies to none of the grid's methods ({', '.join(_methods(configs))})")
    return _checked(configs, options, source="--grid")


def sweep_configs(path: str | Path, options: MethodOptions = MethodOptions()) -> list[tuple[str, Method]]:
    """The configs of a sweep file (`.yaml`, `.yml` or `.json`).

    Example file:

    ```yaml
    - name: slow
      ema_power: 0.3
    - method: uniform        # named uniform-last4
      last: 4
    - method: power-ema      # named power-ema-sigma0.1
      sigma_rel: 0.1
    ```
    """
    path = Path(path)
    data = _load(path)
    if isinstance(data, dict):
        entries = [_named(name, params) for name, params in data.items()]
    elif isinstance(data, list):
        entries = data
    else:
        raise DataError(f"--sweep {path}: expected a list of configs (or a mapping of names to configs)")
    if not entries:
        raise DataError(f"--sweep {path}: no configs in it")
    if len(entries) > MAX_CONFIGS:
        raise DataError(f"--sweep {path}: {len(entries)} configs; one run takes at most {MAX_CONFIGS}")
    configs: list[tuple[str, Method]] = []
    for number, entry in enumerate(entries, 1):
        where = f"--sweep {path}, config {number}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping of fields, got {_short(entry)}")
        fields = {_field_name(str(key)): value for key, value in entry.items() if key != "name"}
        if len(fields) + ("name" in entry) < len(entry):
            raise UsageError(f"{where}: a field is given twice (e.g. sigma-rel and sigma_rel)")
        params = {key: parse_value(key, value, where) for key, value in fields.items() if value is not None}
        method = _known(str(params.pop("method", options.method)), where)
        name, config = _config(method, params, options, where=where, named="method" in fields)
        if entry.get("name") is not None:
            name = _name_text(entry["name"], where)
        configs.append((name, config))
    return check_names(_check_options_used(configs, options, source=f"--sweep {path}"), source=f"--sweep {path}")


def check_names(configs: Sequence[tuple[str, object]], *, source: str) -> list:
    """Config names must be distinct, also to a file system that ignores case (macOS's, Windows'), and each a plain
    folder name: no separator, no leading dot, no control character, valid Unicode, at most `MAX_NAME_BYTES` bytes,
    and not named like a file of a model folder or a checkpoint."""
    seen: dict[str, str] = {}
    for name, _ in configs:
        problem = _name_problem(name)
        if problem:
            raise UsageError(f"{source}: config name {name!r} {problem}")
        folded = unicodedata.normalize("NFC", name).casefold()
        if folded in seen:
            same = f"named {name!r}" if seen[folded] == name else f"named {seen[folded]!r} and {name!r}, one folder where case is ignored"
            raise UsageError(f"{source}: two configs are {same}; names must be distinct")
        seen[folded] = name
    return list(configs)


def config_name(params: dict[str, object]) -> str:
    """The folder name of a config that sets these schedule fields, in order: `ema_power=0.3,bias_power=0.1`."""
    return ",".join(f"{key}={_text(value)}" for key, value in params.items())


# --- the schedule-only interface of earlier versions --------------------------------------------------------------


def parse_grid(specs: Iterable[str], base: BEMASchedule = BEMASchedule()) -> list[tuple[str, BEMASchedule]]:
    """A grid of BEMA schedules (`grid_configs` with schedule fields only).

    Example:

    ```python
    >>> [name for name, _ in parse_grid(["ema_power=0.3,0.5", "bias_power=0.1,0.2"])]
    ['ema_power=0.3,bias_power=0.1', 'ema_power=0.3,bias_power=0.2', 'ema_power=0.5,bias_power=0.1', 'ema_power=0.5,bias_power=0.2']
    ```
    """
    specs = list(specs)
    for item in (part for spec in specs for part in spec.split()):
        key = item.partition("=")[0]
        if "=" in item and key not in SCHEDULE_FIELDS:
            raise UsageError(f"--grid {item}: unknown schedule field {key!r}; choose from {', '.join(SCHEDULE_FIELDS)}")
    return _schedules(grid_configs(specs, MethodOptions(schedule=base)))


def load_sweep(path: str | Path, base: BEMASchedule = BEMASchedule()) -> list[tuple[str, BEMASchedule]]:
    """A sweep file of BEMA schedules (`sweep_configs` with schedule fields only)."""
    configs = sweep_configs(path, MethodOptions(schedule=base))
    for number, (_, config) in enumerate(configs, 1):
        if type(config) is not BEMA:
            raise UsageError(f"--sweep {path}, config {number}: {config.name} is not a BEMA schedule")
    return _schedules(configs)


def _schedules(configs: list[tuple[str, Method]]) -> list[tuple[str, BEMASchedule]]:
    return [(name, config.schedule) for name, config in configs]  # type: ignore[attr-defined]


# --- helpers ---------------------------------------------------------------------------------------------------------


def _config(
    method: str, params: dict[str, object], options: MethodOptions, *, where: str, named: bool
) -> tuple[str, Method]:
    """A config's method (the command line's options, then `params`) and its default name."""
    # the command line's method options follow the config where its method takes them
    inherited = {key: value for key, value in options.given().items() if key not in params}
    applicable = applicable_fields(method, {**inherited, **params})
    own = {**{key: value for key, value in inherited.items() if key in applicable}, **params}
    config = make_method(method, own, schedule=options.schedule, where=where)
    method_set = named or any(key not in SCHEDULE_FIELDS for key in params)
    parts = [config.label()] if method_set else []
    parts += [f"{key}={_text(value)}" for key, value in params.items() if key in SCHEDULE_FIELDS]
    return ",".join(parts) or "default", config


def _check_options_used(configs: list[tuple[str, Method]], options: MethodOptions, *, source: str) -> list[tuple[str, Method]]:
    """A method option on the command line must apply to at least one config (else it is a mistake)."""
    for key in options.given():
        if not any(key in applicable_fields(config.name, config.params()) for _, config in configs):
            raise UsageError(f"--{key.replace('_', '-')} applies to none of the configs of {source} ({', '.join(_methods(configs))})")
    return configs


def _checked(configs: dict[str, Method], options: MethodOptions, *, source: str) -> list[tuple[str, Method]]:
    return check_names(_check_options_used(list(configs.items()), options, source=source), source=source)


def _known(method: str, where: str) -> str:
    if method not in METHODS:
        raise UsageError(f"{where}: unknown method {method!r}; choose from {', '.join(METHODS)}")
    return method


def _methods(configs) -> list[str]:
    items = configs.values() if isinstance(configs, dict) else (config for _, config in configs)
    return list(dict.fromkeys(config.name for config in items))


def _field_name(key: str) -> str:
    return key.strip().replace("-", "_")


def _params_text(params: Mapping[str, object], method: str) -> str:
    return ",".join([f"method={method}", *(f"{key}={_text(value)}" for key, value in params.items())])


def _text(value: object) -> str:
    """A value as written by hand: 0.3, 10 (not 10.0), 0.0001, 100:200."""
    if isinstance(value, tuple):
        return ":".join("" if end is None else str(end) for end in value)
    text = repr(value) if isinstance(value, float) else str(value)
    return text[:-2] if text.endswith(".0") else text


def _named(name: object, params: object) -> object:
    if params is None:
        return {"name": name}
    return {**params, "name": name} if isinstance(params, dict) else params


def _name_text(name: object, where: str) -> str:
    if isinstance(name, bool) or not isinstance(name, (str, int, float)):
        raise UsageError(f"{where}: name must be text, got {_short(name)}")
    return str(name)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_CHECKPOINT_LIKE = re.compile(r"checkpoint-.*", re.IGNORECASE | re.DOTALL)


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return "cannot be a folder name (it is empty)"
    if "/" in name or "\\" in name or name.startswith("."):
        return "cannot be a folder name (no '/', no leading '.')"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "cannot be a folder name (it is not valid Unicode: a lone surrogate)"
    if any(not c.isprintable() for c in name):
        return "cannot be a folder name (it holds a control character such as NUL or a line break)"
    if size > MAX_NAME_BYTES:
        return f"is too long for a folder name ({size} bytes; at most {MAX_NAME_BYTES})"
    lowered = name.lower()
    if lowered.endswith(FILE_SUFFIXES):
        return "is named like a file of a model folder (config.json, model.safetensors, README.md, ...); rename it"
    if _CHECKPOINT_LIKE.fullmatch(name):
        return "is named like a checkpoint folder, which a later run would read as one; rename it"
    return None


def _load(path: Path) -> object:
    """The parsed sweep file: a small regular file of YAML (without aliases) or JSON."""
    raw = read_small_file(path, limit=MAX_SWEEP_BYTES, what="sweep file", refuse=UsageError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--sweep {path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() != ".json":
        return load_yaml(text, what=f"--sweep {path}")
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"--sweep {path}: nested too deeply to be a list of configs") from None
    except ValueError as e:
        raise DataError(f"--sweep {path}: malformed json ({str(e).strip().splitlines()[0]})") from e


__all__ = [
    "FIELDS",
    "MethodOptions",
    "check_names",
    "config_name",
    "grid_configs",
    "load_sweep",
    "method_configs",
    "parse_grid",
    "sweep_configs",
]