"""The `bema-offline` command group and the `bema-average` shortcut.

Errors print one line, `error: ...`, and exit with 2 for bad usage, 1 for bad data, 130 on Ctrl-C;
`--debug` shows the traceback.
"""

from __future__ import annotations

import copy
import errno
import sys
import traceback

import click

from .._version import __version__
from ..engine.kernels import kernel_name
from ..errors import BemaError, UsageError, one_line
from ..faults import environment_error
from ._help import CONTEXT
from .average import average_command
from .demo import demo_command
from .dpo import dpo_command
from .eval import eval_command
from .iterate import iterate_command
from .push import push_command
from .verify import verify_command
from .weights import weights_command

EPILOG = """\b
bema-average is a shortcut for bema-offline average.

\b
Example:
  bema-offline demo                      # a tiny training run, its BEMA and EMA, and their held-out losses
  bema-average runs/dpo --base-model Qwen/Qwen2.5-0.5B --update-freq 100 -o runs/dpo-bema
"""


def _version_message() -> str:
    return f"%(prog)s %(version)s (EMA kernel: {kernel_name() or 'torch ops'})"


class CommandGroup(click.Group):
    """Lists each command with the whole first paragraph of its help, not click's first sentence cut at 45
    characters."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, " ".join((command.help or "").split("\n\n")[0].split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=CommandGroup, context_settings=CONTEXT, epilog=EPILOG)
@click.version_option(__version__, prog_name="bema-offline", message=_version_message())
def cli() -> None:
    """Average a finished training run's checkpoints with BEMA or EMA, offline and streaming; train DPO rounds
    against such averages."""


cli.add_command(average_command, "average")
cli.add_command(demo_command, "demo")
cli.add_command(push_command, "push")
cli.add_command(dpo_command, "dpo")
cli.add_command(iterate_command, "iterate")
cli.add_command(verify_command, "verify")
cli.add_command(weights_command, "weights")
cli.add_command(eval_command, "eval")

# `bema-average` is `bema-offline average` plus --version (a copy, so that the group's command is unchanged)
average_entry = copy.copy(average_command)
average_entry.params = list(average_command.params)
click.version_option(__version__, prog_name="bema-average", message=_version_message())(average_entry)


# What a stopped command leaves, for the line it ends with (`average`, `verify`, `push`, `weights`: nothing)
LEFT_BEHIND = {
    "dpo": "the checkpoints saved so far stay in --output-dir (a new run needs a new folder)",
    "iterate": "finished rounds and checkpoints stay in --workdir: run the same command again to resume",
    "demo": "run it again to start over",
    "eval": "no report was written",
}


def _left_behind(command: click.Command, args: list[str]) -> str:
    name = command.name if not isinstance(command, click.Group) else next((a for a in args if not a.startswith("-")), "")
    return LEFT_BEHIND.get(name, "nothing was written")


def _run(command: click.Command, args: list[str] | None = None, prog_name: str | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    debug = "--debug" in args
    left = _left_behind(command, args)
    try:
        if environment_error() is not None:
            raise UsageError(environment_error())
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo(f"interrupted; {left}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        click.echo(f"interrupted; {left}", err=True)
        sys.exit(130)
    except click.ClickException as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {one_line(e.format_message())} (see --help)", err=True)
        sys.exit(e.exit_code)
    except BemaError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename} -> {e.filename2}: " if e.filename2 else (f"{e.filename}: " if e.filename else "")
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        hint = "; free some disk space or choose another --output" if full else ""
        click.echo(one_line(f"error: {where}{e.strerror or e}{hint}; {left} (--debug shows the traceback)"), err=True)
        sys.exit(1)
    except Exception as e:  # a bug: still one line, unless --debug
        if debug:
            traceback.print_exc()
        click.echo(one_line(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug and report it)"), err=True)
        sys.exit(1)


def main() -> None:
    """Entry point of `bema-offline`."""
    _run(cli, prog_name="bema-offline")


def average_main() -> None:
    """Entry point of `bema-average`, the same as `bema-offline average`."""
    _run(average_entry, prog_name="bema-average")
