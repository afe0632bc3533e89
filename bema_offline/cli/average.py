"""`bema-offline average` (also `bema-average`): replay BEMA/EMA over a run's checkpoints."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from ..api import DEFAULT_MAX_MEMORY, DEFAULT_MAX_SHARD_SIZE, average, open_run
from ..engine.distributed import launched
from ..errors import BemaError
from ..output.report import plan_report, run_warnings
from ..sources.hub import is_hub_url
from ._help import CONTEXT, SectionedCommand, debug_option, option
from ._methods import (
    SCHEDULE_SECTION,
    cadence_from_run,
    method_configs_from_options,
    method_options,
    schedule_options,
    sweep_options,
)
from .eval import quiet_libraries, require_eval_extra
from .push import AveragePush, push_to_hub_options

EPILOG = """\b
Examples:
  bema-average runs/dpo --base-model Qwen/Qwen2.5-0.5B --update-freq 100 --output runs/dpo-bema
  bema-average runs/dpo --update-after 200 --update-freq 100 --every-update --output runs/dpo-bema
  bema-average runs/dpo --base-model ./base --save ema,bema --dry-run
  bema-average runs/dpo --base-model ./base --grid ema_power=0.3,0.5,0.7 bias_power=0.1,0.2 -o runs/dpo-sweep
LoRA runs (checkpoint-N/ of PEFT adapters; the base model is the one the adapter config names, or --base-model):
  bema-average runs/dpo-lora --update-freq 50 -o runs/dpo-lora-bema
  bema-average runs/dpo-lora --update-freq 50 --lora-output adapter -o runs/dpo-lora-bema-adapter
  bema-average runs/dpo-lora --lora-output adapter --lora-rank 16 -o runs/dpo-lora-bema-r16
Methods, and runs on the Hub:
  bema-average runs/dpo --method uniform --last 4 -o runs/dpo-uniform
  bema-average hf://my-org/dpo-run --base-model my-org/base --update-freq 100 -o out
  bema-average hf://EleutherAI/pythia-160m --revisions 'step*' --max-step 10000 --method uniform --last 8 -o out
  bema-average hf://my-org/dpo-run --base-model my-org/base --no-keep-downloads -o out
"""
LORA_SECTION = "Adapters (LoRA/PEFT)"


def _steps(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of steps") from None


def _kinds(ctx, param, value: str) -> list[str]:
    kinds = [part.strip() for part in value.split(",") if part.strip()]
    bad = [k for k in kinds if k not in ("bema", "ema")]
    if bad or not kinds:
        raise click.BadParameter(f"{value!r}: choose bema, ema or ema,bema")
    return kinds


@click.command(cls=SectionedCommand, epilog=EPILOG, context_settings=CONTEXT)
@click.argument("ckpt_dir", metavar="RUN")
@option("--base-model", section="Input", help="Weights before training (θ0 when --update-after is 0): a local folder or a Hub repo id.")
@option("--revisions", section="Input", help="For a run on the Hub published as revisions (Pythia, OLMo): names or patterns, e.g. step1000,step2000 or 'step*'; a revision's step is the number after 'step' in its name, or its only number.")
@option("--keep-downloads/--no-keep-downloads", default=True, show_default=True, section="Input", help="For a run on the Hub: keep the downloaded checkpoints in huggingface_hub's cache, or delete each once read; disk is then about one checkpoint (plus the one downloading) + the output + the running state, 4 bytes per parameter per θ0, EMA and weighted sum.")
@option("--min-step", type=int, section="Input", help="Ignore checkpoints before this step.")
@option("--max-step", type=int, section="Input", help="Ignore checkpoints after this step.")
@option("--allow-missing", is_flag=True, section="Input", help="Skip update steps that have no checkpoint (recorded in the provenance) instead of failing.")
@method_options
@schedule_options
@option("--no-bias-correction", is_flag=True, section=SCHEDULE_SECTION, help="Write the plain EMA (α = 0), same as --save ema.")
@sweep_options
@option("--output", "-o", type=click.Path(path_type=Path), section="Output", help="Output folder. Default: RUN/bema-offline (needed for a run on the Hub).")
@option("--save", default="bema", show_default=True, callback=_kinds, section="Output", help="What to write: bema, ema, or ema,bema (one subfolder each).")
@option("--every-update", is_flag=True, section="Output", help="Write one folder per update step: OUTPUT/step-N/.")
@option("--steps", callback=_steps, section="Output", help="Write these update steps, e.g. 800,1600: OUTPUT/step-N/.")
@option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), section="Output", help="Output dtype of float tensors. Default: the checkpoints'.")
@option("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, show_default=True, section="Output", help="Largest safetensors shard.")
@option("--overwrite", is_flag=True, section="Output", help="Replace an existing output folder.")
@option("--resume", is_flag=True, section="Output", help="Reuse the shards an interrupted run with the same plan finished (checked by a hash of inputs, parameters and version).")
@option(
    "--lora-output", type=click.Choice(["merged", "adapter"]), default="merged", show_default=True, section=LORA_SECTION,
    help="For a run of LoRA adapters: merged writes the full model W0 + s·Σ wᵢ·Bᵢ·Aᵢ; adapter writes a PEFT adapter "
    "folder that holds that average exactly (rank r × checkpoints), for PeftModel.from_pretrained(base, OUTPUT).",
)
@option("--lora-rank", type=click.IntRange(min=1), metavar="R", section=LORA_SECTION, help="With --lora-output adapter: truncate each module to rank R by SVD; the card and bema_offline.json give each module's relative error.")
@option(
    "--lora-average", type=click.Choice(["exact", "factors"]), default="exact", show_default=True, section=LORA_SECTION,
    help="exact: the average of the checkpoints' weights. factors: average A and B separately (what a naive script "
    "does; not the average of the weights): a warning, and each module's difference from exact in bema_offline.json.",
)
@option("--max-memory", default=DEFAULT_MAX_MEMORY, show_default=True, section="Performance", help="Upper bound on the working memory for tensor data, above the Python baseline (and torch's, for the dtypes the C kernel does not cover). The engine takes at most 8 MiB per thread even when allowed more: larger groups fall out of the CPU cache and run slower.")
@option("--threads", type=int, section="Performance", help="Worker threads. Default: one per core. Results do not depend on it.")
@option("--device", default="cpu", show_default=True, section="Performance", help="Where the arithmetic runs: cpu, cuda or cuda:N (under torchrun, cuda is each rank's local GPU). Same bits on the CPU whatever --threads; a GPU's are not checked against TRL's here.")
@option("--accum-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True, section="Performance", help="Accumulation dtype.")
@option("--select-by", type=click.Path(path_type=Path), section="Selection (needs the eval extra)", help="After a sweep, evaluate every output on this held-out data (JSONL, Parquet or a saved datasets folder; the metric follows its columns, see bema-offline eval) and publish the winner as OUTPUT/best, a real folder whose card carries the leaderboard. With --push-to-hub, only the winner is pushed.")
@option("--select-metric", section="Selection (needs the eval extra)", help="The metric to rank by. Default: loss, or reward_accuracy for preference data.")
@push_to_hub_options
@option("--dry-run", is_flag=True, section="Run", help="Print the plan (steps, β, α, effective weights) and write nothing.")
@option("--quiet", "-q", is_flag=True, section="Run", help="No progress bars or summary.")
@debug_option
def average_command(
    ckpt_dir: str,
    revisions: str | None,
    keep_downloads: bool,
    base_model: str | None,
    min_step: int | None,
    max_step: int | None,
    allow_missing: bool,
    no_bias_correction: bool,
    output: Path | None,
    save: list[str],
    every_update: bool,
    steps: list[int] | None,
    dtype: str | None,
    max_shard_size: str,
    overwrite: bool,
    resume: bool,
    max_memory: str,
    threads: int | None,
    device: str,
    accum_dtype: str,
    lora_output: str,
    lora_rank: int | None,
    lora_average: str,
    dry_run: bool,
    quiet: bool,
    debug: bool,
    **options: Any,
) -> None:
    """Average the checkpoint-N folders of RUN (BEMA by default, or any --method) and write Hugging Face model
    folders.

    The checkpoints are streamed tensor by tensor within --max-memory, in one read whatever the number of configs.
    TRL's BEMACallback is replayed exactly: with fp32 checkpoints the result is bit-identical to TRL's online bema/
    folder. Every other method is a weighted sum of the checkpoints (see bema-offline weights). A run of LoRA
    adapters is averaged exactly through its effective weights, W0 + s·Σ wᵢ·Bᵢ·Aᵢ, as a full model or an adapter.
    """
    select_by, select_metric = options.pop("select_by"), options.pop("select_metric")
    if select_metric and not select_by:
        raise click.UsageError("--select-metric needs --select-by DATA")
    if select_by is not None:
        if dry_run:
            raise click.UsageError("--select-by evaluates the outputs written; it cannot run with --dry-run")
        if lora_output == "adapter":
            raise click.UsageError("--select-by evaluates model folders, not PEFT adapters: use --lora-output merged")
        require_eval_extra()  # before any averaging
        _check_selection(select_by, select_metric)
    if every_update and steps:
        raise click.UsageError("--every-update and --steps exclude each other")
    if no_bias_correction:
        if "bema" in save and save != ["bema"]:
            raise click.UsageError("--no-bias-correction writes the plain EMA; do not also ask for --save bema")
        save = ["ema"]
    if is_hub_url(ckpt_dir) and output is None:
        raise click.UsageError(f"{ckpt_dir} is on the Hub: give --output")
    output = output if output is not None else Path(ckpt_dir) / "bema-offline"
    main_rank = not launched() or os.environ.get("RANK", "0") == "0"
    started = time.perf_counter()
    with open_run(ckpt_dir, output, revisions=revisions, keep_downloads=keep_downloads, progress=not quiet) as (run_dir, hub):
        cadence = cadence_from_run(run_dir, options, min_step=min_step, max_step=max_step)
        configs = method_configs_from_options(**options)
        if select_by is not None and not every_update and len(steps or [None]) < 2 and len(configs) * len(save) < 2:
            raise click.UsageError("--select-by picks the best of several outputs; this run would write one (use --grid or --sweep)")
        push = AveragePush.from_options(options, dry_run=dry_run)  # a missing token fails here, before any averaging
        result = average(
            hub or run_dir,
            output,
            schedule=configs if configs[0][0] else configs[0][1],
            base_model=base_model,
            save=save,
            steps="every" if every_update else (steps or "last"),
            min_step=min_step,
            max_step=max_step,
            allow_missing=allow_missing,
            accum_dtype=accum_dtype,
            dtype=dtype,
            max_memory=max_memory,
            threads=threads,
            device=device,
            distributed=launched(),
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            dry_run=dry_run,
            progress=not quiet and main_rank,
            resume=resume,
            lora_output=lora_output,
            lora_rank=lora_rank,
            lora_average=lora_average,
            keep_downloads=keep_downloads,
        )
    if not main_rank:  # rank 0 of a torchrun launch reports for all
        return
    if select_by is not None and len(result.outputs) < 2:
        raise click.UsageError("--select-by picks the best of several outputs; this run wrote one (use --grid or --sweep)")
    if dry_run:
        click.echo(plan_report(result.plan, [str(o.path) for o in result.outputs]))
        if cadence:
            click.echo(f"\n{cadence}")
        if push:
            click.echo("\n" + push.describe(output, [o.path for o in result.outputs]))
        click.echo("\ndry run: nothing was written")
        return
    winner = _select(output, select_by, select_metric, device=device, quiet=quiet) if select_by is not None else None
    pushed = winner if winner is not None else output  # with --select-by, only the winner goes to the Hub
    if quiet:
        if push:
            push.run(pushed)
        return
    if result.removed_leftovers:
        click.echo(f"removed the leftovers of an interrupted run at {output}", err=True)
    if result.resume_note:
        click.echo(f"note: {result.resume_note}", err=True)
    if result.reused_shards:
        click.echo(f"resumed an interrupted run: reused {result.reused_shards} finished shards", err=True)
    for note in ([cadence] if cadence else []) + result.plan.notes:
        click.echo(f"note: {note}", err=True)
    for line in run_warnings(result.plan):
        click.echo(line, err=True)
    elapsed = time.perf_counter() - started
    adapter = " (a PEFT adapter)" if result.plan.lora is not None and result.plan.lora.output == "adapter" else ""
    for out in result.outputs:
        click.echo(f"wrote {out.path}: {out.kind} at step {out.step}{adapter}")
    nbytes = result.plan.bytes_to_read if result.bytes_read is None else result.bytes_read
    click.echo(f"read {nbytes / 2**20:.1f} MiB from {len(result.plan.sources)} sources in {elapsed:.1f} s")
    if push:
        push.run(pushed, echo=click.echo)


def _check_selection(data: Path, metric: str | None) -> None:
    """`--select-by DATA` and `--select-metric`, checked before any averaging: the data reads, and the metric is one
    it gives."""
    from ..eval.data import load_eval_data
    from ..eval.runner import ranking_metric

    with quiet_libraries():
        kind = load_eval_data(data, option="--select-by").kind
    ranking_metric(metric, kind, None, option="--select-metric")


def _select(output: Path, data: Path, metric: str | None, *, device: str, quiet: bool) -> Path:
    """Evaluate the outputs of a finished sweep and publish the winner as OUTPUT/best (see `eval.select_best`)."""
    from ..eval import select_best

    try:
        with quiet_libraries():
            selection = select_best(output, data, metric=metric, device=device, log=None if quiet else lambda line: click.echo(line, err=True))
    except BemaError as e:  # the averages are written: say how to finish without averaging again
        raise type(e)(f"{e}; the averages are in {output}: rank them with `bema-offline eval {output} --data {data} --publish-best`") from e
    if not quiet:
        click.echo(selection.report.table())
        click.echo(f"published {selection.winner} as {selection.best}")
    return selection.best
