"""`bema-offline iterate`: rounds of DPO (TRL), each against an average of the round before; resumable."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..errors import UsageError
from ..files import read_small_file
from ..methods.base import Method
from ..methods.registry import METHODS, SCHEDULE_FIELDS, applicable_fields
from ..safe_yaml import load_yaml
from ._help import CONTEXT, SectionedCommand, debug_option, option
from ._methods import (
    METHOD_OPTIONS,
    method_configs_from_options,
    method_parameter_options,
    schedule_from_options,
    schedule_options,
)
from .dpo import TRAINING, library_output, lora_from_options, lora_options, progress_bars_wanted

FIXED_REFERENCES = ("last", "base")
# The same as train.rounds_plan.REFERENCES (which imports torch): every method of bema-average, and last and base.
REFERENCES = ("bema", "ema", *FIXED_REFERENCES, *(name for name in METHODS if name not in ("bema", "ema")))
POLICY_INITS = ("reference", "last")
EPILOG = """\b
Examples:
  bema-offline iterate --base-model ./base --dataset prefs.jsonl --rounds 3 --save-steps 100 --max-steps 1000 --workdir runs/iter
  bema-offline iterate ... --reference uniform --last 4          # the mean of round k's 4 newest checkpoints
  bema-offline iterate ... --reference power-ema --sigma-rel 0.1 # EDM2's post-hoc EMA of round k
  bema-offline iterate ... --reference base                      # plain multi-round DPO (each round still averaged)
  bema-offline iterate ... --lora-r 16 --lora-target-modules all-linear  # LoRA rounds: each average merged, a full model
  bema-offline iterate --config rounds.yaml                      # the same plan, from a file
  bema-offline iterate --config rounds.yaml --rounds 4           # options on the command line win: one more round
  bema-offline iterate ... --eval-data heldout.jsonl --push-to-hub my-org/dpo-rounds

Run the same command again to resume a killed run.

\b
A rounds.yaml holds the options' names as keys (relative paths are taken from the file's folder):
  base_model: ./base
  dataset: [round1.jsonl, round2.jsonl]
  rounds: 2
  save_steps: 100
  reference: uniform
  last: 4
  config_set: {warmup_steps: 10}
  lora_r: 16
  lora_set: {use_rslora: true}
"""
# The options that a --config file may give, by parameter name; the others (--config, --quiet, --debug) are not plan.
NOT_IN_CONFIG = ("config_file", "quiet", "debug")
PATHS = ("base_model", "dataset", "workdir", "eval_data")


@click.command(cls=SectionedCommand, epilog=EPILOG, context_settings=CONTEXT)
@option("--config", "config_file", type=click.Path(path_type=Path), section="Plan", help="A YAML file giving the plan: keys are these options' names (base_model, dataset, rounds, ...). Options given on the command line win.")
@option("--base-model", type=click.Path(path_type=Path), section="Plan", help="Model folder: round 1's policy and reference, and the yardstick of --eval-data. Required.")
@option("--dataset", type=click.Path(path_type=Path), multiple=True, section="Plan", help="Preference data (.json, .jsonl, .parquet or a save_to_disk folder): once for every round, or once per round. Required.")
@option("--rounds", type=click.IntRange(min=1), section="Plan", help="Number of rounds K. Required. More rounds than a finished run had extend it.")
@option("--workdir", type=click.Path(path_type=Path), section="Plan", help="Where round-K/, round-K-bema/, rounds.json, rounds.md and rounds.png go. Required. The same folder again resumes the run.")
@option(
    "--reference", type=click.Choice(REFERENCES), metavar="METHOD|last|base", default="bema", show_default=True, section="Plan",
    help="Round k+1's reference: an average of round k's checkpoints by any method of bema-average (bema, ema, "
    "dema, ouema, uniform, power-ema, wsm, expo; their options below; step 0 is where round k started), round k's "
    "last checkpoint (last), or always the base model (base: plain multi-round DPO). With last and base each round "
    "is still averaged, with BEMA, for the rounds table and the Hub.",
)
@option(
    "--policy-init", type=click.Choice(POLICY_INITS), section="Plan",
    help="Start round k+1's policy from its reference, or from round k's last checkpoint (with --lora-r: merged onto "
    "round k's policy, as round-K-last/). Default: reference (last with --reference base).",
)
@option("--save-steps", type=click.IntRange(min=1), section=TRAINING, help="Checkpoint every N steps; also the default --update-freq, so that every checkpoint is an update step. Required.")
@option("--max-steps", type=int, section=TRAINING, help="Training steps per round. Default: TRL's num_train_epochs (3) over the round's data. Giving it lets the averaging method be checked against each round's checkpoints before anything trains.")
@option("--beta", type=float, section=TRAINING, help="DPO β. TRL's default: 0.1.")
@option("--learning-rate", type=float, section=TRAINING, help="TRL's default: 1e-6.")
@option("--per-device-train-batch-size", type=int, section=TRAINING, help="TRL's default: 8.")
@option("--bf16/--no-bf16", default=None, section=TRAINING, help="bf16 mixed precision. Default: on when a CUDA GPU supports it.")
@option("--precompute-ref-log-probs", is_flag=True, section=TRAINING, help="Compute the reference log-probs before training, then release the reference model.")
@option("--config-set", "config_set", multiple=True, metavar="KEY=VALUE", section=TRAINING, help="Any other DPOConfig field, e.g. --config-set warmup_steps=10. Repeatable.")
@lora_options
@method_parameter_options
@schedule_options
@option(
    "--eval-data", type=click.Path(path_type=Path), section="Evaluation",
    help="Held-out data, evaluated after each round as bema-offline eval does (its columns choose the metrics): "
    "preference pairs give the DPO reward accuracy, margin and loss against the base model (a fixed yardstick, "
    "with --beta and max_length); text, messages or prompt + completion give loss and perplexity. The round's "
    "reference, last checkpoint and average, in rounds.md and rounds.png.",
)
@option("--push-to-hub", metavar="ORG/NAME", section="Hub", help="Push each round's average as it finishes to branch round-K of this repo, with the rounds table on the main branch (token: HF_TOKEN or `hf auth login`).")
@option("--private", is_flag=True, section="Hub", help="Create the repo private.")
@option("--quiet", "-q", is_flag=True, section="Run", help="Only errors: no progress lines, bars, logs or warnings.")
@debug_option
def iterate_command(config_file: Path | None, quiet: bool, debug: bool, **options: Any) -> None:
    """Run K rounds of DPO with TRL: round k+1 trains against an average (BEMA by default) of round k's checkpoints.

    Each round trains from its policy (the base model in round 1) against its reference, saving checkpoint-N/
    folders every --save-steps; bema-average then averages them (BEMA by default, or the --reference method, with
    θ0 where the round started), and that average is the next round's reference. With --lora-r each round trains a
    LoRA adapter, and its average is merged onto the round's policy: a full model again. rounds.json records each
    round as it finishes. Running the same command again resumes a killed run: a round killed while training goes
    on from its last checkpoint, finished rounds and averages are reused once their fingerprints are checked, and a
    changed plan is refused.
    """
    from ..train.dpo import parse_config_overrides, require_dpo_extra
    from ..train.iterate import IteratePlan, run_rounds

    ctx = click.get_current_context()
    given = {name for name in options if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    if config_file is not None:
        options, from_file = merge_config(ctx, config_file, options)
        given |= from_file
    missing = [name for name in ("base_model", "dataset", "rounds", "workdir", "save_steps") if not options.get(name)]
    if missing:
        names = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise click.UsageError(f"{names}: required, on the command line or in --config")
    require_dpo_extra()
    save_steps = options["save_steps"]
    method = average_method(options, given)
    plan = IteratePlan(
        base_model=options["base_model"],
        datasets=tuple(options["dataset"]),
        rounds=options["rounds"],
        workdir=options["workdir"],
        save_steps=save_steps,
        reference=options["reference"],
        policy_init=options["policy_init"],
        max_steps=options["max_steps"],
        beta=options["beta"],
        learning_rate=options["learning_rate"],
        per_device_train_batch_size=options["per_device_train_batch_size"],
        bf16=options["bf16"],
        precompute_ref_log_probs=bool(options["precompute_ref_log_probs"]),
        config_overrides=parse_config_overrides(options["config_set"]),
        method=method,
        lora=lora_from_options(**options),
        eval_data=options["eval_data"],
        push_to_hub=options["push_to_hub"],
        private=bool(options["private"]),
    )
    if plan.private and not plan.push_to_hub:
        raise click.UsageError("--private needs --push-to-hub ORG/NAME")
    with library_output(quiet=quiet):
        run_rounds(plan, log=(lambda line: None) if quiet else click.echo, progress=progress_bars_wanted(quiet))


def average_method(options: dict[str, Any], given: set[str]) -> Method:
    """Each round's average: the --reference method (BEMA with last and base) with its options, on a schedule whose
    update_freq is --save-steps unless given.

    Raises:
        `UsageError`: an option the method does not take (`--last` with `--reference bema`, `--ema-power` with
            `--reference uniform`), or a missing one (`--sigma-rel` for power-ema).
    """
    reference = options["reference"]
    name = "bema" if reference in FIXED_REFERENCES else reference
    prefix = f"--reference {reference} averages each round with bema: " if reference in FIXED_REFERENCES else ""
    params = {key: options.get(key) for key in METHOD_OPTIONS if key != "method" and options.get(key) is not None}
    taken = applicable_fields(name, params)
    unused = [key for key in SCHEDULE_FIELDS if key in given and key not in taken]
    if unused:
        own = [f"--{key.replace('_', '-')}" for key in taken if key not in SCHEDULE_FIELDS]
        takes = f"it takes {', '.join(own)}" if own else "it takes no options"
        raise UsageError(f"{prefix}--{unused[0].replace('_', '-')} does not apply to --reference {name} ({takes})")
    update_freq = options["save_steps"] if options["update_freq"] is None else options["update_freq"]
    schedule = schedule_from_options(**{**options, "update_freq": update_freq})
    try:
        [(_, method)] = method_configs_from_options(schedule=schedule, **{**options, "method": name})
    except UsageError as e:
        raise UsageError(f"{prefix}{e}") from None
    return method


# --- the --config file ------------------------------------------------------------------------------------------


def merge_config(ctx: click.Context, path: Path, options: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The options with the values of a YAML plan file filled in where the command line gave none, and the names of
    the options the file gave.

    Raises:
        `UsageError`: an unreadable file, an unknown key, a YAML alias, or a value of the wrong type.
    """
    data = load_config(path)
    params = {param.name: param for param in ctx.command.params if param.name not in NOT_IN_CONFIG}
    merged = dict(options)
    from_file = set()
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            close = difflib.get_close_matches(name, params, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the keys are the options' names: {', '.join(params)}"
            raise UsageError(f"--config {path}: unknown key {key!r}{hint}")
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            continue  # the command line wins
        param = params[name]
        if name in ("config_set", "lora_set") and isinstance(value, dict):
            value = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
        if param.multiple and not isinstance(value, list):
            value = [value]
        if name in PATHS and value is not None:
            value = [_relative_to(path, v) for v in value] if param.multiple else _relative_to(path, value)
        try:
            merged[name] = param.process_value(ctx, value)  # its type, then its callback (--window's A:B)
        except click.BadParameter as e:
            raise UsageError(f"--config {path}: {key}: {e.message}") from None
        except UsageError as e:
            raise UsageError(f"--config {path}: {key}: {e}") from None
        except (TypeError, ValueError):  # a list or a mapping where click expects a value
            raise UsageError(f"--config {path}: {key}: {value!r} is not a value of {param.opts[0]} ({param.type.name})") from None
        from_file.add(name)
    return merged, from_file


def _relative_to(config: Path, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    return path if path.is_absolute() else config.parent / path


def load_config(path: Path) -> dict:
    """A YAML mapping of option names to values, read bounded; aliases and repeated keys are refused, and YAML 1.1's
    base-60 numbers are read as text (`window: 2:4` is steps 2 to 4, not 124): see `safe_yaml.load_yaml`."""
    raw = read_small_file(path, limit=2**20, what="plan file", refuse=UsageError)
    data = load_yaml(raw, what=f"--config {path}", refuse=UsageError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values, got a {type(data).__name__}")
    return data
