"""`bema-offline iterate`: rounds of DPO (TRL), each against an average of the round before; resumable."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..errors import UsageError
from ..methods.schedule import BEMASchedule
from ._help import CONTEXT, SectionedCommand, debug_option, option
from .dpo import TRAINING, library_output, progress_bars_wanted

REFERENCES = ("bema", "ema", "last", "base")
POLICY_INITS = ("reference", "last")
SCHEDULE = "Averages (TRL's BEMACallback; update_freq = --save-steps, update_after = 0)"
EPILOG = """\b
Examples:
  bema-offline iterate --base-model ./base --dataset prefs.jsonl --rounds 3 --save-steps 100 --max-steps 1000 --workdir runs/iter
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
  config_set: {warmup_steps: 10}
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
@option("--reference", type=click.Choice(REFERENCES), default="bema", show_default=True, section="Plan", help="Round k+1's reference: round k's BEMA or EMA (averaged from round k's checkpoints), its last checkpoint, or always the base model (plain multi-round DPO).")
@option("--policy-init", type=click.Choice(POLICY_INITS), section="Plan", help="Start round k+1's policy from its reference, or from round k's last checkpoint. Default: reference (last with --reference base).")
@option("--save-steps", type=click.IntRange(min=1), section=TRAINING, help="Checkpoint every N steps; also the averages' update_freq, so every checkpoint is an update step. Required.")
@option("--max-steps", type=int, section=TRAINING, help="Training steps per round. Default: one epoch of the round's data.")
@option("--beta", type=float, section=TRAINING, help="DPO β. TRL's default: 0.1.")
@option("--learning-rate", type=float, section=TRAINING, help="TRL's default: 1e-6.")
@option("--per-device-train-batch-size", type=int, section=TRAINING, help="TRL's default: 8.")
@option("--bf16/--no-bf16", default=None, section=TRAINING, help="bf16 mixed precision. Default: on when a CUDA GPU supports it.")
@option("--precompute-ref-log-probs", is_flag=True, section=TRAINING, help="Compute the reference log-probs before training, then release the reference model.")
@option("--config-set", "config_set", multiple=True, metavar="KEY=VALUE", section=TRAINING, help="Any other DPOConfig field, e.g. --config-set warmup_steps=10. Repeatable.")
@option("--ema-power", type=float, default=0.5, show_default=True, section=SCHEDULE, help="κ: β = (lag + multiplier·t)^-κ.")
@option("--bias-power", type=float, default=0.2, show_default=True, section=SCHEDULE, help="η: α = (lag + multiplier·t)^-η.")
@option("--lag", type=float, default=10, show_default=True, section=SCHEDULE, help="ρ: virtual starting age of the schedule.")
@option("--multiplier", type=float, default=1.0, show_default=True, section=SCHEDULE, help="γ: time multiplier.")
@option("--min-ema-multiplier", type=float, default=0.0, show_default=True, section=SCHEDULE, help="Lower clamp on β.")
@option("--eval-data", type=click.Path(path_type=Path), section="Evaluation", help="Held-out preference data: after each round, the DPO reward accuracy and margin (against the base model) of the reference, the last checkpoint and the average, in rounds.md and rounds.png.")
@option("--push-to-hub", metavar="ORG/NAME", section="Hub", help="Push each round's average as it finishes to branch round-K of this repo, with the rounds table on the main branch (token: HF_TOKEN or `hf auth login`).")
@option("--private", is_flag=True, section="Hub", help="Create the repo private.")
@option("--quiet", "-q", is_flag=True, section="Run", help="Only errors: no progress lines, bars, logs or warnings.")
@debug_option
def iterate_command(config_file: Path | None, quiet: bool, debug: bool, **options: Any) -> None:
    """Run K rounds of DPO with TRL: round k+1 trains against an average (BEMA by default) of round k's checkpoints.

    Each round trains from its policy (the base model in round 1) against its reference, saving checkpoint-N/
    folders every --save-steps; bema-average then makes the round's BEMA (θ0: where the round started), which is
    the next round's reference. rounds.json records each round as it finishes. Running the same command again
    resumes a killed run: a round killed while training goes on from its last checkpoint, finished rounds and
    averages are reused once their fingerprints are checked, and a changed plan is refused.
    """
    from ..train.dpo import parse_config_overrides, require_dpo_extra
    from ..train.iterate import IteratePlan, run_rounds

    ctx = click.get_current_context()
    if config_file is not None:
        options = merge_config(ctx, config_file, options)
    missing = [name for name in ("base_model", "dataset", "rounds", "workdir", "save_steps") if not options.get(name)]
    if missing:
        names = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise click.UsageError(f"{names}: required, on the command line or in --config")
    require_dpo_extra()
    save_steps = options["save_steps"]
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
        schedule=BEMASchedule(
            update_freq=save_steps,
            ema_power=options["ema_power"],
            bias_power=options["bias_power"],
            lag=options["lag"],
            multiplier=options["multiplier"],
            min_ema_multiplier=options["min_ema_multiplier"],
        ),
        eval_data=options["eval_data"],
        push_to_hub=options["push_to_hub"],
        private=bool(options["private"]),
    )
    if plan.private and not plan.push_to_hub:
        raise click.UsageError("--private needs --push-to-hub ORG/NAME")
    with library_output(quiet=quiet):
        run_rounds(plan, log=(lambda line: None) if quiet else click.echo, progress=progress_bars_wanted(quiet))


# --- the --config file ------------------------------------------------------------------------------------------


def merge_config(ctx: click.Context, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The options with the values of a YAML plan file filled in where the command line gave none.

    Raises:
        `UsageError`: an unreadable file, an unknown key, a YAML alias, or a value of the wrong type.
    """
    data = load_config(path)
    params = {param.name: param for param in ctx.command.params if param.name not in NOT_IN_CONFIG}
    merged = dict(options)
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            close = difflib.get_close_matches(name, params, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the keys are the options' names: {', '.join(params)}"
            raise UsageError(f"--config {path}: unknown key {key!r}{hint}")
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            continue  # the command line wins
        param = params[name]
        if name == "config_set" and isinstance(value, dict):
            value = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
        if param.multiple and not isinstance(value, list):
            value = [value]
        if name in PATHS and value is not None:
            value = [_relative_to(path, v) for v in value] if param.multiple else _relative_to(path, value)
        try:
            merged[name] = param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise UsageError(f"--config {path}: {key}: {e.message}") from None
    return merged


def _relative_to(config: Path, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    return path if path.is_absolute() else config.parent / path


def load_config(path: Path) -> dict:
    """A YAML mapping of option names to values; aliases and repeated keys are refused."""
    import yaml

    class PlanLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise UsageError(
                    f"--config {path}, line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed; write the value out"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key_node, deep=True) for key_node, _ in node.value]
            repeated = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
            if repeated is not None:
                raise UsageError(f"--config {path}, line {node.start_mark.line + 1}: key {repeated!r} is given twice")
            return super().construct_mapping(node, deep=deep)

    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror or e})") from e
    try:
        data = yaml.load(text, Loader=PlanLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--config {path}: malformed YAML ({first})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values, got a {type(data).__name__}")
    return data
