"""Click helpers: options grouped by theme in `--help`, and the shared `--debug` / `--quiet` flags."""

from __future__ import annotations

import click


class SectionOption(click.Option):
    """A click option that names the `--help` section it belongs to."""

    def __init__(self, *args, section: str = "Options", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


class SectionedCommand(click.Command):
    """Lists options under their sections, in the order the sections first appear."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "section", "Run"), []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


def option(*args, section: str, **kwargs):
    return click.option(*args, cls=SectionOption, section=section, **kwargs)


def debug_option(func):
    return option("--debug", is_flag=True, section="Run", help="Show full tracebacks on errors.")(func)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
