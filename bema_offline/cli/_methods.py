"""The command-line options that choose what to average, shared by `average` and `weights`.

- `method_options`: `--method` and each method's parameters, in a "Method" help section;
- `schedule_options`: TRL's `BEMACallback` schedule (for `bema`, `ema`, `dema`, `ouema`), as `average` has them;
- `sweep_options`: `--grid` and `--sweep`;
- `method_configs_from_options`: the parsed options as a list of named configs, `[(name, Method)]` (one config named
  "" without a grid or a sweep).

Usage in a command:

```python
@click.command(cls=SectionedCommand)
@method_options
@schedule_options
@sweep_options
def command(**options):
    configs = method_configs_from_options(**options)
```
"""

from __future__ import annotations

from pathlib import Path

import click

from ..methods.base import Method
from ..methods.registry import METHODS, parse_value
from ..methods.schedule import BEMASchedule
from ..methods.sweep import MethodOptions, method_configs
from ..methods.windows import DECAYS
from ..sources.run import run_cadence
from ._help import GreedyOption, option

METHOD_SECTION = "Method (what to average; docs/methods.md)"
SCHEDULE_SECTION = "Schedule (TRL's BEMACallback: bema, ema, dema, ouema)"
SWEEP_SECTION = "Sweep (many configs, one read)"
METHOD_OPTIONS = ("method", "last", "window", "half_life", "sigma_rel", "decay", "alpha", "ref_step")
SCHEDULE_OPTIONS = ("update_freq", "ema_power", "bias_power", "lag", "update_after", "multiplier", "min_ema_multiplier", "convention")


def _window(ctx, param, value: str | None) -> int | tuple | None:
    return None if value is None else parse_value("window", value, "--window")


def _method_help() -> str:
    return "; ".join(f"{name}: {text}" for name, text in METHODS.items()) + "."


_METHOD_DECORATORS = [
    option("--method", type=click.Choice(list(METHODS)), metavar="NAME", default="bema", show_default=True, section=METHOD_SECTION, help=_method_help()),
    option("--last", type=int, metavar="K", section=METHOD_SECTION, help="uniform, wsm: the K newest checkpoints."),
    option(
        "--window", callback=_window, metavar="A:B|N", section=METHOD_SECTION,
        help="uniform, wsm: the checkpoints from step A to step B, both included (A: or :B leave an end open); a "
        "number N is the N newest. Default: every checkpoint (after --min-step/--max-step).",
    ),
    option(
        "--half-life", type=float, metavar="STEPS", section=METHOD_SECTION,
        help="ema: a fixed-decay EMA of the saved checkpoints instead of TRL's schedule, taking each checkpoint in "
        "with β = 1 − 0.5^(Δt/STEPS) for its gap Δt (uneven spacing is handled).",
    ),
    option(
        "--sigma-rel", type=float, metavar="X", section=METHOD_SECTION,
        help="power-ema: the width of EDM2's profile ∝ t^γ relative to the last step (EDM2 uses 0.05 to 0.2). It is "
        "evaluated on the checkpoints at hand, each standing for the steps since the one before (the oldest for all "
        "steps before it), so their spacing limits its fidelity: keep the save interval well under X times the last "
        "step.",
    ),
    option("--decay", type=click.Choice(list(DECAYS)), section=METHOD_SECTION, help="wsm: the learning-rate decay shape whose effect the merge emulates."),
    option(
        "--alpha", type=float, metavar="A", section=METHOD_SECTION,
        help="expo: extrapolate to θ_T + A·(θ_T − θ_ref), T the last checkpoint. θ_ref gets the weight −A: negative "
        "for A > 0. A < 0 interpolates towards θ_ref.",
    ),
    option("--ref-step", type=int, metavar="N", section=METHOD_SECTION, help="expo: θ_ref is checkpoint-N (default: the base model)."),
]

_SCHEDULE_DECORATORS = [
    option(
        "--update-freq", type=int, section=SCHEDULE_SECTION,
        help="φ: update every this many steps. Default: the run's save_steps (trainer_state.json), else the checkpoints' "
        "even spacing, else TRL's 400; a line says which.",
    ),
    option("--ema-power", type=float, default=0.5, show_default=True, section=SCHEDULE_SECTION, help="κ: β = (lag + multiplier·t)^-κ; 0 makes the EMA the last iterate."),
    option("--bias-power", type=float, default=0.2, show_default=True, section=SCHEDULE_SECTION, help="η: α = (lag + multiplier·t)^-η; 0 is full correction (α = 1)."),
    option("--lag", type=float, default=10, show_default=True, section=SCHEDULE_SECTION, help="ρ: virtual starting age of the schedule."),
    option("--update-after", type=int, default=0, show_default=True, section=SCHEDULE_SECTION, help="τ: burn-in; θ0 is checkpoint-τ when > 0, the base model when 0."),
    option("--multiplier", type=float, default=1.0, show_default=True, section=SCHEDULE_SECTION, help="γ: time multiplier."),
    option("--min-ema-multiplier", type=float, default=0.0, show_default=True, section=SCHEDULE_SECTION, help="Lower clamp on β."),
    option("--convention", type=click.Choice(["trl", "paper"]), default="trl", show_default=True, section=SCHEDULE_SECTION, help="trl: TRL's BEMACallback; paper: the authors' offline code (every checkpoint, their clock)."),
]

_SWEEP_DECORATORS = [
    option(
        "--grid", multiple=True, cls=GreedyOption, section=SWEEP_SECTION,
        help="Every combination of FIELD=V1,V2,... One folder per config, named after what it sets: "
        "--grid ema_power=0.3,0.5 bias_power=0.1,0.2 gives OUTPUT/ema_power=0.3,bias_power=0.1/, ...; "
        "--grid method=bema,uniform,power-ema last=4,8 sigma_rel=0.1 gives bema, uniform-last4, uniform-last8, "
        "power-ema-sigma0.1 (a field is left out where a method does not take it). Fields: method, last, window, "
        "half_life, sigma_rel, decay, alpha, ref_step and the schedule's; the others come from the options above.",
    ),
    option(
        "--sweep", "sweep_file", type=click.Path(path_type=Path), section=SWEEP_SECTION,
        help="A YAML or JSON list of configs, each a mapping of fields (method: and its parameters, schedule fields) "
        "and an optional name; one folder per config, OUTPUT/NAME/.",
    ),
]


def method_options(func):
    """Add `--method` and the methods' parameters (the "Method" help section)."""
    for decorator in reversed(_METHOD_DECORATORS):
        func = decorator(func)
    return func


def method_parameter_options(func):
    """Add the methods' parameters without `--method` (for a command that names the method another way, as
    `iterate --reference` does)."""
    for decorator in reversed(_METHOD_DECORATORS[1:]):
        func = decorator(func)
    return func


def schedule_options(func):
    """Add TRL's schedule options (`--update-freq` ... `--convention`), with TRL's names and defaults."""
    for decorator in reversed(_SCHEDULE_DECORATORS):
        func = decorator(func)
    return func


def sweep_options(func):
    """Add `--grid` and `--sweep`."""
    for decorator in reversed(_SWEEP_DECORATORS):
        func = decorator(func)
    return func


def cadence_from_run(run_dir: Path, options: dict, *, min_step: int | None, max_step: int | None) -> str | None:
    """Fill in `--update-freq` from the run (`sources.run.run_cadence`) when it was not given; return the line that
    says where it came from (printed once the command has succeeded), or None."""
    if options.get("update_freq") is not None:
        return None
    options["update_freq"], origin = run_cadence(run_dir, min_step=min_step, max_step=max_step)
    return f"--update-freq {options['update_freq']}: {origin}"


def schedule_from_options(**options) -> BEMASchedule:
    """The `BEMASchedule` of the schedule options (other keyword arguments are ignored)."""
    return BEMASchedule(**{name: options[name] for name in SCHEDULE_OPTIONS})


def method_configs_from_options(
    *, grid: tuple[str, ...] = (), sweep_file: Path | None = None, schedule: BEMASchedule | None = None, **options
) -> list[tuple[str, Method]]:
    """The named configs that the parsed options describe.

    Args:
        grid (`tuple[str, ...]`): `--grid` items.
        sweep_file (`Path`, *optional*): `--sweep`.
        schedule (`BEMASchedule`, *optional*): the schedule; by default, built from the schedule options in
            `options`.
        **options: the parsed `method_options` (and `schedule_options`); other keyword arguments are ignored.

    Returns:
        `list[tuple[str, Method]]`: one config named "" without a grid or a sweep, else one per config.

    Raises:
        `UsageError`: an option a method does not take (`--last` with `--method bema`), a missing one
            (`--method power-ema` without `--sigma-rel`), or a bad grid; `DataError`: a bad sweep file.
    """
    if schedule is None:
        schedule = schedule_from_options(**options)
    params = {name: options.get(name) for name in METHOD_OPTIONS if name != "method"}
    choice = MethodOptions(options.get("method") or "bema", params, schedule)
    return method_configs(choice, grid=grid, sweep=sweep_file)
