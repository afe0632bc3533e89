"""`bema-offline eval`: evaluate model folders or a sweep's outputs on held-out data, rank them, and plot the ranking;
needs `bema-offline[eval]`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from ..errors import BemaError
from ._help import CONTEXT, SectionedCommand, debug_option, option

EPILOG = """\b
Examples:
  bema-offline eval runs/sweep --data heldout.jsonl --baselines          # ranks every output, writes runs/sweep/eval.*
  bema-offline eval runs/sweep --data prefs-heldout.jsonl --beta 0.1     # DPO reward accuracy against the run's θ0
  bema-offline eval runs/sweep --data heldout.jsonl --publish-best       # and copies the winner to runs/sweep/best
  bema-offline eval runs/a-bema runs/b-bema --data chat.jsonl -o reports/ --device cuda --dtype bfloat16
  bema-offline eval runs/sweep --lm-eval-tasks arc_easy,hellaswag --lm-eval-limit 200
\b
The data's columns decide the metrics: text (loss, perplexity); messages (the same on the assistant tokens, through the
chat template); prompt + completion (completion-only loss); prompt + chosen + rejected (DPO reward accuracy and margin
against --ref-model, DPO loss, chosen loss).
"""


def _tasks(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    tasks = [part.strip() for part in value.split(",") if part.strip()]
    if not tasks:
        raise click.BadParameter(f"{value!r}: give task names separated by commas, e.g. arc_easy,hellaswag")
    return tasks


@click.command(cls=SectionedCommand, epilog=EPILOG, context_settings=CONTEXT)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@option("--data", type=click.Path(path_type=Path), section="Data", help="Held-out data: .jsonl, .json or .parquet, or a save_to_disk folder, with text, messages, prompt/completion or prompt/chosen/rejected columns.")
@option("--metric", section="Data", help="Rank by this metric: loss (default), perplexity; for preference data reward_accuracy (default), reward_margin, dpo_loss, chosen_loss; or TASK/METRIC of an lm-eval task.")
@option("--ref-model", type=click.Path(path_type=Path), section="Data", help="Preference data: the DPO reference. Default: the run's θ0 from the outputs' bema_offline.json (the base model, or checkpoint-τ with --update-after τ).")
@option("--beta", type=float, default=0.1, show_default=True, section="Data", help="Preference data: DPO's β for the implicit rewards (TRL's default).")
@option("--max-length", type=int, section="Data", help="Longest sequence in tokens; longer ones keep their start (reported). Default: the model's max_position_embeddings.")
@option("--tokenizer", type=click.Path(path_type=Path), section="Data", help="Tokenizer folder for the data. Default: the first model's.")
@option("--baselines", is_flag=True, section="Models", help="Also evaluate the run's base model and its newest checkpoint, read from the outputs' bema_offline.json.")
@option("--lm-eval-tasks", callback=_tasks, metavar="TASK,...", section="lm-evaluation-harness", help="Also run these lm-eval tasks on every model, through lm-eval's own API (pip install 'bema-offline[eval]').")
@option("--lm-eval-include", type=click.Path(path_type=Path), section="lm-evaluation-harness", help="A folder of lm-eval task YAML files (local tasks, local data).")
@option("--lm-eval-limit", type=int, section="lm-evaluation-harness", help="At most this many documents per task.")
@option("--lm-eval-num-fewshot", type=int, section="lm-evaluation-harness", help="Few-shot examples per prompt. Default: each task's own.")
@option("--device", default="cpu", show_default=True, section="Performance", help="cpu, cuda or cuda:N.")
@option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True, section="Performance", help="The dtype models are loaded in; log-probabilities are always computed in float32.")
@option("--batch-size", type=int, default=8, show_default=True, section="Performance", help="Sequences per forward pass. Models are loaded one at a time.")
@option("--output", "-o", type=click.Path(path_type=Path), section="Output", help="Folder for eval.json, eval.md and eval.png. Default: the sweep folder, when one is given.")
@option("--publish-best", is_flag=True, section="Output", help="Copy the winner to SWEEP/best (a real folder, renamed into place atomically) with the leaderboard in its card. Needs one sweep folder.")
@option("--quiet", "-q", is_flag=True, section="Run", help="No progress and no table (the files are still written).")
@debug_option
def eval_command(
    models: tuple[Path, ...],
    data: Path | None,
    metric: str | None,
    ref_model: Path | None,
    beta: float,
    max_length: int | None,
    tokenizer: Path | None,
    baselines: bool,
    lm_eval_tasks: list[str] | None,
    lm_eval_include: Path | None,
    lm_eval_limit: int | None,
    lm_eval_num_fewshot: int | None,
    device: str,
    dtype: str,
    batch_size: int,
    output: Path | None,
    publish_best: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Evaluate MODELS (model folders, or a sweep folder whose outputs are discovered) on held-out data and rank them.

    Models are evaluated one at a time, in the same padding-aware batches, so memory is one model plus one batch's
    activations and the numbers are deterministic. The ranking goes to stdout; eval.json, eval.md and eval.png (the
    metric against the swept parameters, beside the winner's effective weights) go to the sweep folder or --output.
    A tie or a NaN metric is reported, never hidden.
    """
    require_eval_extra()
    from ..eval import LmEvalSettings, evaluate, select_best

    if (lm_eval_include or lm_eval_limit is not None or lm_eval_num_fewshot is not None) and not lm_eval_tasks:
        raise click.UsageError("--lm-eval-include, --lm-eval-limit and --lm-eval-num-fewshot need --lm-eval-tasks")
    lm_eval = LmEvalSettings(
        tasks=lm_eval_tasks, include_path=str(lm_eval_include) if lm_eval_include else None, limit=lm_eval_limit,
        num_fewshot=lm_eval_num_fewshot,
    ) if lm_eval_tasks else None
    say = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    settings = dict(metric=metric, ref_model=ref_model, beta=beta, device=device, dtype=dtype, batch_size=batch_size,
                    max_length=max_length, tokenizer=tokenizer, lm_eval=lm_eval, baselines=baselines, log=say)
    with quiet_libraries():
        if publish_best:
            if len(models) != 1:
                raise click.UsageError("--publish-best needs exactly one sweep folder")
            if output is not None and output.resolve() != models[0].resolve():
                raise click.UsageError("--publish-best writes the report into the sweep folder; leave out --output")
            selection = select_best(models[0], data, **settings)
            report, written = selection.report, selection.report_files
        else:
            report = evaluate(list(models), data, **settings)
            folder = output or report.sweep_dir
            written = []
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                written = report.write(folder)
    if quiet:
        return
    click.echo(report.table())
    if written:
        click.echo(f"wrote {', '.join(str(path) for path in written)}")
    else:
        click.echo("note: pass --output DIR to write eval.json, eval.md and eval.png")
    if publish_best:
        click.echo(f"published {selection.winner} as {selection.best}")


class MissingEvalExtraError(BemaError):
    """transformers or datasets is not installed."""

    exit_code = 1


def require_eval_extra() -> None:
    missing = []
    for module in ("transformers", "datasets"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingEvalExtraError(f"bema-offline eval needs {', '.join(missing)}: pip install 'bema-offline[eval]'")


@contextlib.contextmanager
def quiet_libraries(*, errors_only: bool = True):
    """No loading bars from transformers and no progress bars from datasets, and (`errors_only`) no load reports
    from transformers, for the block only (a folder whose weights do not fit fails with its own error)."""
    import datasets
    import transformers

    logging = transformers.utils.logging
    bars = (logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if errors_only:
        logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars[0]:
            logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()
        logging.set_verbosity(verbosity)
