"""YAML for files a user hands over (sweep and round plans, a run's model card): safe, bounded, unambiguous.

PyYAML's `safe_load` builds no objects, but three of its habits do not suit these files:

- it expands aliases: a few hundred bytes of nested `*refs` (a "billion laughs") become billions of nodes, in memory
  and in any message that prints them. Nothing these files hold needs an alias: one is refused with a clear line;
- it reads YAML 1.1's base-60 numbers: `window: 2:4` would be 124. A scalar with a colon stays text;
- it keeps the last of two equal keys in a mapping silently: a key given twice is refused.

PyYAML is imported only here, when a YAML file is read.
"""

from __future__ import annotations

from collections.abc import Hashable

from .errors import BemaError, DataError, first_line


def load_yaml(text: str | bytes, *, what: str, refuse: type[BemaError] = DataError) -> object:
    """Parse YAML like `yaml.safe_load`, refusing aliases and repeated keys, and reading `A:B` as text.

    Args:
        text (`str | bytes`): the document.
        what (`str`): what it is, for messages, e.g. "--sweep sweep.yaml".
        refuse (`type[BemaError]`, defaults to `DataError`): the error to raise (`UsageError` for an option's file).

    Raises:
        `refuse`: malformed YAML, an alias, a repeated key, or nesting too deep.
    """
    import yaml

    class _Strict(yaml.SafeLoader):
        def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise refuse(f"{what}: line {event.start_mark.line + 1} uses a YAML alias (*{event.anchor}); write each value out in full")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):  # noqa: ANN001
            keys = [self.construct_object(key_node, deep=True) for key_node, _ in node.value]
            repeated, seen = None, set()
            for key in keys:  # (linear: a card of 4 MiB may hold 300,000 keys)
                marker = key if isinstance(key, Hashable) else ("unhashable", repr(key))  # (PyYAML refuses those next)
                if marker in seen:
                    repeated = key
                    break
                seen.add(marker)
            if repeated is not None:
                raise refuse(f"{what}: line {node.start_mark.line + 1}: key {repeated!r} is given twice")
            return super().construct_mapping(node, deep=deep)

        def construct_number_or_text(self, node):  # noqa: ANN001
            if ":" in str(node.value):  # YAML 1.1 reads 2:4 as 2·60 + 4; a window A:B stays text
                return self.construct_scalar(node)
            return (self.construct_yaml_int if node.tag.endswith(":int") else self.construct_yaml_float)(node)

    for tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        _Strict.add_constructor(tag, _Strict.construct_number_or_text)
    try:
        return yaml.load(text, Loader=_Strict)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise refuse(f"{what}: nested too deeply") from None
    except BemaError:
        raise
    except Exception as e:  # yaml.YAMLError, and the ValueErrors and TypeErrors of some malformed documents
        raise refuse(f"{what}: malformed YAML ({first_line(e)[:200]})") from e
