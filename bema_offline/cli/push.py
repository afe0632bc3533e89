"""`bema-offline push`: push an averaged output folder to the Hub; also the `--push-to-hub` options of
`bema-average`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..errors import BemaError
from ..output.hub import LAYOUTS, check_repo_id, find_outputs, find_token, push_targets, push_to_hub
from ._help import CONTEXT, SectionedCommand, debug_option, option

EPILOG = """\b
Examples:
  bema-offline push runs/dpo-bema my-org/qwen-dpo-bema --private
  bema-offline push runs/dpo-bema my-org/qwen-dpo-bema --push-layout branches   # one branch per step-N/
  bema-average runs/dpo --base-model ./base --update-freq 100 -o runs/dpo-bema --push-to-hub my-org/qwen-dpo-bema
"""


def push_settings(func):
    """--private, --revision, --commit-message and --push-layout, in the Hub section of --help."""
    decorators = [
        option("--private", is_flag=True, section="Hub", help="Create the repos private (an existing public repo is refused)."),
        option("--revision", metavar="BRANCH", section="Hub", help="Push to this branch (created from main if missing)."),
        option("--commit-message", metavar="MSG", section="Hub", help="Commit message. Default: one naming the output."),
        option(
            "--push-layout",
            type=click.Choice(LAYOUTS),
            default="repos",
            show_default=True,
            section="Hub",
            help="For several outputs: one repo each (ORG/NAME-step-800, ...) or one repo with a branch each.",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def push_to_hub_options(func):
    """`bema-average`'s --push-to-hub and the push settings."""
    func = push_settings(func)
    return option(
        "--push-to-hub",
        metavar="ORG/NAME",
        section="Hub",
        help="After a successful average, push the output to this Hub repo (token: HF_TOKEN or `hf auth login`).",
    )(func)


@dataclass(frozen=True)
class AveragePush:
    """A push that `bema-average` does after its average, checked before the average starts."""

    repo_id: str
    private: bool
    revision: str | None
    commit_message: str | None
    layout: str
    token: str | None

    @classmethod
    def from_options(cls, options: dict[str, Any], *, dry_run: bool) -> AveragePush | None:
        """None without --push-to-hub. Checks the repo id and (unless a dry run) finds the token, so that a
        missing token stops the run before any averaging."""
        if not options.get("push_to_hub"):
            for name in ("private", "revision", "commit_message"):
                if options.get(name):
                    raise click.UsageError(f"--{name.replace('_', '-')} needs --push-to-hub ORG/NAME")
            context = click.get_current_context(silent=True)
            if context is not None and context.get_parameter_source("push_layout") == click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError("--push-layout needs --push-to-hub ORG/NAME")
            return None
        repo_id = options["push_to_hub"]
        check_repo_id(repo_id)
        token = None if dry_run else find_token()
        return cls(repo_id, options["private"], options["revision"], options["commit_message"], options["push_layout"], token)

    def describe(self, output: Path, folders: list[Path]) -> str:
        relpaths = [folder.relative_to(output).as_posix() if folder != output else "" for folder in folders]
        targets = push_targets(relpaths, self.repo_id, layout=self.layout, revision=self.revision)
        return "\n".join(f"would push {folder} to {repo}" + (f"@{branch}" if branch else "") for folder, (repo, branch) in zip(folders, targets))

    def run(self, output: Path, *, echo=None) -> None:
        try:
            push_to_hub(
                output,
                self.repo_id,
                private=self.private,
                revision=self.revision,
                commit_message=self.commit_message,
                layout=self.layout,
                token=self.token,
                log=echo,
            )
        except BemaError as e:
            hint = f"the average itself is written at {output}: push it with `bema-offline push {output} {self.repo_id}`"
            raise type(e)(f"{e}; {hint}") from e


@click.command(cls=SectionedCommand, epilog=EPILOG, context_settings=CONTEXT)
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="ORG/NAME")
@push_settings
@option("--dry-run", is_flag=True, section="Run", help="Check the folder and names and print what would go where; no network.")
@debug_option
def push_command(
    output_dir: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    push_layout: str,
    dry_run: bool,
    debug: bool,
) -> None:
    """Push OUTPUT_DIR, a folder written by bema-average, to the Hub repo ORG/NAME.

    The whole folder goes up in one commit: weights, config, tokenizer, README.md, the weights chart and
    bema_offline.json. The model card is rendered again for the repo (its load snippet names it), and
    bema_offline.json goes up without local paths (the run's folders relative to it, other paths by name).
    OUTPUT_DIR itself is never changed: the upload folder beside it holds hard links, and is removed. A folder
    with several outputs (--every-update, --save ema,bema) pushes each, as --push-layout says. The repos and
    branches are created before anything is uploaded, so a missing token or a name you cannot write to fails first.
    """
    outputs = find_outputs(output_dir)
    targets = push_targets([relpath for relpath, _ in outputs], repo_id, layout=push_layout, revision=revision)
    if dry_run:
        for (_, folder), (repo, branch) in zip(outputs, targets):
            files = sorted(path.name for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
            click.echo(f"would push {folder} to {repo}" + (f"@{branch}" if branch else "") + f": {', '.join(files)}")
        click.echo("dry run: nothing was pushed")
        return
    push_to_hub(
        output_dir,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        layout=push_layout,
        log=click.echo,
    )
