"""`bema-offline demo`: a real tiny training run with plain torch, averaged, in a few seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..api import average
from ..errors import UsageError
from ..methods.schedule import BEMASchedule
from ..output.chart import weights_bar_chart
from ._help import CONTEXT, SectionedCommand, debug_option, option
from .dpo import progress_bars_wanted

MARKER = ".bema-demo"


@click.command(cls=SectionedCommand, context_settings=CONTEXT,
               epilog="\b\nExample:\n  bema-offline demo --workdir /tmp/bema-demo")
@option("--workdir", type=click.Path(path_type=Path), default=Path("bema-demo"), show_default=True, section="Demo",
        help="Where the run and its averages go (a previous demo there is replaced).")
@option("--steps", type=click.IntRange(min=1), default=240, show_default=True, section="Demo", help="Training steps.")
@option("--save-every", type=click.IntRange(min=1), default=20, show_default=True, section="Demo", help="Checkpoint (and BEMA update) every this many steps.")
@option("--seed", type=int, default=0, show_default=True, section="Demo", help="Random seed.")
@option("--quiet", "-q", is_flag=True, section="Run", help="No progress output (progress bars are shown on a terminal only).")
@debug_option
def demo_command(workdir: Path, steps: int, save_every: int, seed: int, quiet: bool, debug: bool) -> None:
    """Pretrain a tiny Llama-shaped causal LM, fine-tune it for a few seconds saving Trainer-style checkpoints,
    then average them with BEMA and EMA and compare held-out losses."""
    from ..train.demo import heldout_loss, make_demo_run

    if steps < save_every:
        raise UsageError(f"--steps {steps} is fewer than --save-every {save_every}: the demo would save no checkpoint")
    if workdir.exists():
        if not (workdir / MARKER).exists():
            raise UsageError(f"--workdir {workdir} exists and is not a previous demo; choose another folder")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).touch()
    say = (lambda *a: None) if quiet else click.echo
    bars = progress_bars_wanted(quiet)  # on a terminal only: in a log file they are carriage returns and escapes
    say(f"pretraining a tiny causal LM (the base model), then fine-tuning it for {steps} steps "
        f"with a checkpoint every {save_every} -> {workdir / 'run'}")
    demo = make_demo_run(workdir / "run", steps=steps, save_every=save_every, seed=seed, progress=bars)
    schedule = BEMASchedule(update_freq=save_every)
    output = workdir / "averaged"
    say(f"bema-average {demo.run_dir} --base-model {demo.base_dir} --update-freq {save_every} --save ema,bema --output {output}")
    result = average(demo.run_dir, output, schedule=schedule, base_model=demo.base_dir, save=("ema", "bema"), progress=bars)
    last = max(result.plan.found_steps)
    rows = [("base model (step 0)", demo.base_dir), (f"last checkpoint (step {last})", demo.run_dir / f"checkpoint-{last}")]
    rows += [(f"{o.kind.upper()} at step {o.step}", o.path) for o in result.outputs]
    say("\nheld-out loss:")
    for label, folder in rows:
        say(f"  {label:<28} {heldout_loss(folder):.4f}   {folder}")
    bema = next(o for o in result.outputs if o.kind == "bema")
    say("\neffective weight of each checkpoint in the BEMA:")
    say(weights_bar_chart(bema.weights))
