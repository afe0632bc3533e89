"""`bema-offline dpo`: one round of DPO (TRL) against a frozen BEMA reference; needs `bema-offline[dpo]`."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ._help import CONTEXT, SectionedCommand, debug_option, option
from .eval import quiet_libraries

EPILOG = """\b
Iterative DPO, round by round (the BEMA of round k is the reference of round k+1):
  bema-offline dpo --ref-model base --dataset prefs1.jsonl --output-dir runs/round1 --save-steps 100 --max-steps 1000
  bema-average runs/round1 --base-model base --update-freq 100 -o runs/round1-bema
  bema-offline dpo --ref-model runs/round1-bema --dataset prefs2.jsonl --output-dir runs/round2 --save-steps 100 --max-steps 1000
bema-offline iterate --rounds K does all of this, resumes a killed run, and records it in rounds.json.

\b
With LoRA: each round trains an adapter; bema-average merges its checkpoints into a full model, the next reference:
  bema-offline dpo --ref-model base --lora-r 16 --lora-target-modules all-linear --dataset prefs1.jsonl --output-dir runs/round1 --save-steps 100
  bema-average runs/round1 --update-freq 100 -o runs/round1-bema
  bema-offline dpo --ref-model runs/round1-bema --lora-r 16 --lora-target-modules all-linear --dataset prefs2.jsonl --output-dir runs/round2 --save-steps 100
"""
TRAINING = "Training (TRL's DPOConfig)"
LORA = "LoRA (peft's LoraConfig; the policy trains an adapter)"

_LORA_DECORATORS = [
    option(
        "--lora-r", type=click.IntRange(min=1), metavar="R", section=LORA,
        help="Train a LoRA adapter of rank R on the policy instead of all its weights; the checkpoints then hold "
        "adapters, which bema-average merges onto the policy's folder into a full model.",
    ),
    option("--lora-alpha", type=float, section=LORA, help="lora_alpha (the scaling is lora_alpha / r). peft's default: 8."),
    option("--lora-dropout", type=float, section=LORA, help="Dropout on the adapter's input. peft's default: 0."),
    option("--lora-target-modules", metavar="NAMES", section=LORA, help="all-linear, or module names separated by commas (q_proj,v_proj). Default: peft's choice for the architecture."),
    option(
        "--lora-set", "lora_set", multiple=True, metavar="KEY=VALUE", section=LORA,
        help="Any other LoraConfig field, checked against LoraConfig, e.g. --lora-set use_rslora=true --lora-set "
        "modules_to_save=lm_head. Repeatable.",
    ),
]


def lora_options(func):
    """Add `--lora-r`, `--lora-alpha`, `--lora-dropout`, `--lora-target-modules` and `--lora-set` (the LoRA help
    section), shared by `dpo` and `iterate`; `lora_from_options` turns them into a `peft.LoraConfig`."""
    for decorator in reversed(_LORA_DECORATORS):
        func = decorator(func)
    return func


def lora_from_options(
    *,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    lora_target_modules: str | None = None,
    lora_set: Sequence[str] = (),
    **_ignored: Any,
):
    """The `peft.LoraConfig` that the `--lora-*` options ask for, or None without `--lora-r` (other keyword
    arguments are ignored, so that a command can pass all its options).

    Raises:
        `click.UsageError`: a LoRA option without `--lora-r`. `UsageError`: a field or value `LoraConfig` refuses
            (see `train.dpo.lora_config`).
    """
    from ..train.dpo import lora_config

    settings = {"r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "target_modules": lora_target_modules}
    if lora_r is None:
        if any(value is not None for value in settings.values()) or lora_set:
            raise click.UsageError("--lora-alpha, --lora-dropout, --lora-target-modules and --lora-set configure the adapter that --lora-r asks for; add --lora-r")
        return None
    return lora_config(**settings, pairs=lora_set)


@click.command(cls=SectionedCommand, epilog=EPILOG, context_settings=CONTEXT)
@option("--ref-model", type=click.Path(path_type=Path), required=True, section="Models", help="Reference model folder, e.g. the bema-average output of the previous round. Loaded on its own, frozen, and checked bit for bit against its safetensors.")
@option("--policy", help="The policy's starting point (folder or Hub id). Default: the --ref-model folder, loaded again as a separate model.", section="Models")
@option("--dataset", type=click.Path(path_type=Path), required=True, section="Data", help="Preference data: .json, .jsonl or .parquet, or a save_to_disk folder, with prompt/chosen/rejected columns (strings or {role, content} messages).")
@option("--output-dir", type=click.Path(path_type=Path), required=True, section="Output", help="Where checkpoint-N/ folders go, ready for bema-average; use a new folder each round.")
@option("--save-steps", type=click.IntRange(min=1), section="Output", help="Checkpoint every N steps. Set it to the --update-freq of the next bema-average (save_steps = update_freq) so the checkpoints fall on its BEMA update steps. TRL's default: 500.")
@option("--beta", type=float, section=TRAINING, help="DPO β: how far the policy may move from the reference. TRL's default: 0.1.")
@option("--learning-rate", type=float, section=TRAINING, help="TRL's default: 1e-6.")
@option("--max-steps", type=int, section=TRAINING, help="Training steps. Default: TRL's num_train_epochs (3 epochs of --dataset).")
@option("--per-device-train-batch-size", type=int, section=TRAINING, help="TRL's default: 8.")
@option("--bf16/--no-bf16", default=None, section=TRAINING, help="bf16 mixed precision. Default: on when a CUDA GPU supports it.")
@option("--precompute-ref-log-probs", is_flag=True, section=TRAINING, help="Compute the reference log-probs before training, then release the reference model, so it does not stay in memory.")
@option("--config-set", "config_set", multiple=True, metavar="KEY=VALUE", section=TRAINING, help="Any other DPOConfig field, checked against DPOConfig, e.g. --config-set warmup_steps=10 --config-set loss_type=sigmoid. Repeatable.")
@lora_options
@option("--quiet", "-q", is_flag=True, section="Run", help="Only errors: no progress bars, logs or warnings.")
@debug_option
def dpo_command(
    ref_model: Path,
    policy: str | None,
    dataset: Path,
    output_dir: Path,
    save_steps: int | None,
    beta: float | None,
    learning_rate: float | None,
    max_steps: int | None,
    per_device_train_batch_size: int | None,
    bf16: bool | None,
    precompute_ref_log_probs: bool,
    config_set: tuple[str, ...],
    lora_r: int | None,
    lora_alpha: float | None,
    lora_dropout: float | None,
    lora_target_modules: str | None,
    lora_set: tuple[str, ...],
    quiet: bool,
    debug: bool,
) -> None:
    """Train one round of DPO whose reference model is --ref-model (a BEMA average), with TRL.

    The reference is a separate, frozen model, and its sha256 fingerprint is logged and checked against the
    folder's safetensors before and after training. Checkpoints land in --output-dir as checkpoint-N/, where the
    next bema-average reads them; set --save-steps to that average's --update-freq.
    """
    from ..train.dpo import parse_config_overrides, require_dpo_extra, train_dpo

    require_dpo_extra()
    overrides = parse_config_overrides(config_set)
    lora = lora_from_options(
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target_modules=lora_target_modules, lora_set=lora_set
    )
    with library_output(quiet=quiet):
        train_dpo(
            ref_model,
            dataset,
            output_dir,
            policy=policy,
            beta=beta,
            learning_rate=learning_rate,
            max_steps=max_steps,
            per_device_train_batch_size=per_device_train_batch_size,
            save_steps=save_steps,
            bf16=bf16,
            precompute_ref_log_probs=precompute_ref_log_probs,
            config_overrides=overrides,
            lora=lora,
            progress=progress_bars_wanted(quiet),
            log=(lambda line: None) if quiet else click.echo,
        )


def progress_bars_wanted(quiet: bool) -> bool:
    """Progress bars go to stderr, and only to a terminal: in a log file their carriage returns and cursor
    movements are noise."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def library_output(*, quiet: bool):
    """What the training libraries print, for the duration of a round only.

    `quiet`: no progress bars, logs, warnings or Trainer prints. Otherwise, when stderr is not a terminal: no
    progress bars (the Trainer's logs still print, one line each), so that a log file holds no escape codes.
    """
    with warnings.catch_warnings():
        # transformers deprecated a name that TRL still calls, once per step: nothing a user can act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if not quiet and progress_bars_wanted(quiet):
            yield
        else:
            with _without_bars(quiet=quiet):
                yield


@contextlib.contextmanager
def _without_bars(*, quiet: bool):
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # TRL's and the Trainer's own tqdm bars read it
    try:
        with quiet_libraries(errors_only=quiet), contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(warnings.catch_warnings())
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                warnings.simplefilter("ignore")
            yield
    finally:
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable
