"""YAML for files a user hands over (sweep and round plans, a run's model card): safe, bounded, aliases refused.

PyYAML's `safe_load` builds no objects, but it expands aliases: a few hundred bytes of nested `*refs` (a "billion
laughs") become billions of nodes, in memory and in any message that prints them. Nothing these files hold needs
an alias, so one is refused with a clear line. PyYAML is imported only here, when a YAML file is read.
"""

from __future__ import annotations

from .errors import DataError


def load_yaml(text: str | bytes, *, what: str) -> object:
    """Parse YAML like `yaml.safe_load`, refusing aliases (`*name`).

    Args:
        text (`str | bytes`): the document.
        what (`str`): what it is, for the message, e.g. "--sweep sweep.yaml".

    Raises:
        `DataError`: malformed YAML, or an alias.
    """
    import yaml

    class _NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise DataError(f"{what}: line {event.start_mark.line + 1} uses a YAML alias (*{event.anchor}); write each value out in full")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise DataError(f"{what}: nested too deeply") from None
    except DataError:
        raise
    except Exception as e:  # yaml.YAMLError, and the ValueErrors and TypeErrors of some malformed documents
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{what}: malformed YAML ({first_line[:200]})") from e
