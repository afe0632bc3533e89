"""`bema-offline weights`: what each averaging method would make of a run, from the checkpoint names alone."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import click

from ..api import open_run
from ..errors import BemaError
from ..methods.base import Method
from ..output.chart import plot_weights, source_name, weights_bar_chart
from ..sources.run import find_checkpoints
from ._help import CONTEXT, SectionedCommand, debug_option, option
from ._methods import cadence_from_run, method_configs_from_options, method_options, schedule_options, sweep_options

EPILOG = """\b
Examples:
  bema-offline weights runs/dpo --base-model Qwen/Qwen2.5-0.5B --update-freq 100
  bema-offline weights runs/dpo --method uniform --last 4
  bema-offline weights runs/dpo --method power-ema --sigma-rel 0.1 --max-step 2000
  bema-offline weights runs/dpo --base-model ./base --update-freq 100 \\
      --grid method=bema,ema,uniform,power-ema,wsm last=8 sigma_rel=0.1 decay=1-sqrt --plot weights.png
"""


@click.command(cls=SectionedCommand, epilog=EPILOG, context_settings=CONTEXT)
@click.argument("ckpt_dir", metavar="RUN")
@option("--base-model", section="Input", help="Say that the weights before training (step 0) exist, as averaging would be given them. Nothing is read.")
@option("--revisions", section="Input", help="For a run on the Hub published as revisions: names or patterns (step1000,step2000 or 'step*').")
@option("--min-step", type=int, section="Input", help="Ignore checkpoints before this step.")
@option("--max-step", type=int, section="Input", help="Ignore checkpoints after this step (the weights of an output at that step).")
@option("--allow-missing", is_flag=True, section="Input", help="Skip update steps that have no checkpoint instead of failing.")
@method_options
@schedule_options
@sweep_options
@option("--plot", type=click.Path(path_type=Path), section="Output", help="Also draw every output's weight profile on one figure (PNG; needs matplotlib, the plot extra).")
@debug_option
def weights_command(
    ckpt_dir: str,
    revisions: str | None,
    base_model: str | None,
    min_step: int | None,
    max_step: int | None,
    allow_missing: bool,
    plot: Path | None,
    debug: bool,
    **options,
) -> None:
    """Print the effective weight of the base model and of every checkpoint in each output that averaging RUN
    would write (a table and a text chart), with any method, grid or sweep. Only the checkpoints' folder names (and,
    for the default --update-freq, the newest trainer_state.json) are read: no tensor.

    Every output is an affine combination of the base model and the checkpoints: its weights sum to 1. Some may be
    negative (BEMA's on the base model, DEMA's, ExPO's on θ_ref).
    """
    with tempfile.TemporaryDirectory(prefix="bema-weights-") as scratch:  # a Hub run's folder of links goes there
        with open_run(ckpt_dir, Path(scratch) / "out", revisions=revisions) as (run_dir, _):  # lists a Hub run, reads no weights
            cadence = cadence_from_run(run_dir, options, min_step=min_step, max_step=max_step)
            configs = method_configs_from_options(**options)
            steps = sorted(find_checkpoints(run_dir, min_step=min_step, max_step=max_step))
    outputs: dict[str, tuple[Method, dict[int, float]]] = {}
    for name, method in configs:
        try:
            outputs[name] = (method, method.weights(steps, base=base_model is not None, allow_missing=allow_missing))
        except BemaError as e:
            if name:
                raise type(e)(f"config {name}: {e}") from None
            raise
    shown = ", ".join(map(str, steps[:12])) + (f", ... ({len(steps)} in all)" if len(steps) > 12 else "")
    lines = [f"run: {ckpt_dir}", f"checkpoints: {len(steps)} (steps {shown}); base model: {'given' if base_model is not None else 'not given'}"]
    lines += [cadence] if cadence else []
    for name, (method, weights) in outputs.items():
        title = f"config {name}: " if name else ""
        lines += [
            "",
            f"{title}{method.describe()}, at step {max(weights)} (weights sum to {math.fsum(weights.values()):.6f})",
            weights_bar_chart(weights),
        ]
    if len(outputs) > 1:
        lines += ["", "weights by source, one column per output:", _table({name: w for name, (_, w) in outputs.items()})]
    click.echo("\n".join(lines))
    if plot is not None:
        profiles = {name or method.label(): weights for name, (method, weights) in outputs.items()}
        plot_weights(profiles, plot, title=f"effective weights of {Path(ckpt_dir).name or ckpt_dir}'s outputs")
        click.echo(f"\nwrote {plot}")


def _table(outputs: dict[str, dict[int, float]]) -> str:
    """Sources down, outputs across; '.' where an output does not use a source."""
    sources = sorted({step for weights in outputs.values() for step in weights})
    widths = [max(10, len(name)) for name in outputs]
    header = f"{'source':>17} " + " ".join(f"{name:>{width}}" for name, width in zip(outputs, widths))
    rows = [header]
    for step in sources:
        cells = [
            f"{weights[step]:>+{width}.6f}" if step in weights else f"{'.':>{width}}"
            for weights, width in zip(outputs.values(), widths)
        ]
        rows.append(f"{source_name(step):>17} " + " ".join(cells))
    return "\n".join(rows)
