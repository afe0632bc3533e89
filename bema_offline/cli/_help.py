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


class GreedyOption(SectionOption):
    """A repeatable option whose value also takes the `NAME=VALUES` arguments that follow it, so that
    `--grid ema_power=0.3,0.5 bias_power=0.1,0.2` reads as one grid. The values are joined with spaces."""

    def add_to_parser(self, parser, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            # click's parser is private; if its shape ever changes, the option stays a plain repeatable one
            parser_option = getattr(parser, "_long_opt", {}).get(name) or getattr(parser, "_short_opt", {}).get(name)
            if parser_option is None or not hasattr(parser_option, "process"):
                continue
            process = parser_option.process

            def greedy(value, state, process=process):
                values = [value]
                while state.rargs and "=" in state.rargs[0] and not state.rargs[0].startswith("-"):
                    values.append(state.rargs.pop(0))
                process(" ".join(values), state)

            parser_option.process = greedy


def option(*args, section: str, **kwargs):
    kwargs.setdefault("cls", SectionOption)
    return click.option(*args, section=section, **kwargs)


def debug_option(func):
    return option("--debug", is_flag=True, section="Run", help="Show full tracebacks on errors.")(func)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
