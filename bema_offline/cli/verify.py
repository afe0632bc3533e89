"""`bema-offline verify`: re-open an output folder and check it before anyone trusts it."""

from __future__ import annotations

import random
from pathlib import Path

import click

from ..output.publish import leftovers
from ..output.verify import verify
from ..output.writer import parse_size
from ._help import CONTEXT, SectionedCommand, debug_option, option

EPILOG = """\b
Examples:
  bema-offline verify runs/dpo-bema
  bema-offline verify runs/dpo-bema --recompute 5
  bema-offline verify runs/sweep --recompute 2 --seed 0
  bema-offline verify runs/dpo-lora-bema-adapter --recompute 1   # a PEFT adapter output: written again, compared
"""


@click.command(cls=SectionedCommand, epilog=EPILOG, context_settings=CONTEXT)
@click.argument("output", type=click.Path(path_type=Path))
@option("--recompute", type=click.IntRange(min=0), default=0, show_default=True, section="Checks", help="Recompute this many random tensors of each model folder from the checkpoints named in bema_offline.json, and compare them bit for bit (a PEFT adapter output is written again whole, and compared byte for byte).")
@option("--seed", type=int, section="Checks", help="Seed of the random choice of tensors to recompute. Default: a fresh one, printed.")
@option("--max-memory", default="256MiB", show_default=True, section="Performance", help="Working memory for tensor data while reading and recomputing.")
@option("--quiet", "-q", is_flag=True, section="Run", help="Print nothing on success.")
@debug_option
def verify_command(output: Path, recompute: int, seed: int | None, max_memory: str, quiet: bool, debug: bool) -> None:
    """Check the model folder(s) of a bema-average OUTPUT: index and shards, shapes and dtypes against config.json
    and the source checkpoints, every value finite, and bema_offline.json against the folder.

    The outputs of a LoRA run are checked against the base model and the adapter checkpoints they were made from:
    a merged model folder as any model folder, a PEFT adapter folder (--lora-output adapter) by its adapter_config.json
    and adapter_model.safetensors, which must fit the base as peft maps them.

    Exits with 0 when everything checks out, 1 with a one-line error otherwise.
    """
    if seed is not None and not recompute:
        raise click.UsageError("--seed chooses the tensors of --recompute; give --recompute N too")
    if seed is None and recompute:
        seed = random.SystemRandom().randrange(2**31)
    reports = verify(output, recompute=recompute, seed=seed, max_memory=parse_size(max_memory, option="--max-memory"))
    if quiet:
        return
    for path in leftovers(output):
        click.echo(f"note: {path} was left by a killed run; delete it (rm -r {path})", err=True)
    for report in reports:
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        if report.adapter:
            checks = [f"a PEFT adapter, {_count(report.tensors, 'tensor')}, all finite", "adapter_config.json and header consistent"]
        else:
            checks = [f"{_count(report.tensors, 'tensor')} in {_count(report.shards, 'shard')}, all finite", "index and headers consistent"]
        if report.has_provenance:
            checks.append("bema_offline.json matches")
            steps = ", ".join("base" if s == 0 else str(s) for s in report.sources_checked)
            checks.append(f"shapes and dtypes match the sources (steps {steps})" if steps else "sources not compared")
        else:
            checks.append("no bema_offline.json: provenance and sources not checked")
        if report.recomputed and report.adapter:
            checks.append("the adapter written again from the sources, byte for byte")
        elif report.recomputed:
            checks.append(f"{_count(len(report.recomputed), 'tensor')} recomputed bit for bit (--seed {seed})")
        click.echo(f"ok {report.folder}: {'; '.join(checks)}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
