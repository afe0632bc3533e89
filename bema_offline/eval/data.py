"""The data `bema-offline eval --data` reads, and the metric its columns call for.

The columns decide what is measured, in TRL's dataset formats:

| columns | kind | metrics |
|---|---|---|
| `prompt`, `chosen`, `rejected` (or `chosen`, `rejected` as whole conversations) | `preference` | DPO's implicit reward accuracy and mean margin against a reference, the DPO loss, the chosen loss |
| `prompt`, `completion` | `completion` | loss and perplexity of the completion tokens |
| `messages` | `chat` | loss and perplexity of the assistant tokens, through the tokenizer's chat template |
| `text` | `text` | loss and perplexity of every token |

When several fit, the first in this order wins (a preference file with a `text` column is preference data). Values
are strings, or lists of `{"role", "content"}` messages (always for `messages`); every row must hold the same kind
as the first. Files are read with `bema_offline.train.preferences.load_table`, as `bema-offline dpo` reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..train.preferences import check_preference_schema, load_table, value_kind

DATASET_DICT_FILE = "dataset_dict.json"  # what save_to_disk writes for a DatasetDict
KIND_COLUMNS = {
    "preference": ("prompt", "chosen", "rejected"),
    "completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
}


@dataclass(frozen=True)
class EvalData:
    """Rows to evaluate on, and what they hold.

    Args:
        path (`Path`): where they were read from.
        kind (`str`): "preference", "completion", "chat" or "text" (see the module's table).
        conversational (`bool`): whether the values are lists of messages rather than strings.
        rows (`list[dict]`): the rows, with the columns of their kind only.
        split (`str`, *optional*): the split read from a saved `DatasetDict`.
    """

    path: Path
    kind: str
    conversational: bool
    rows: list[dict]
    split: str | None = None


def data_kind(columns: list[str]) -> str | None:
    """The kind of data that `columns` hold, or None when they fit none.

    Example:

    ```python
    >>> data_kind(["prompt", "chosen", "rejected"]), data_kind(["text", "id"])
    ('preference', 'text')
    ```
    """
    present = set(columns)
    if {"chosen", "rejected"} <= present:
        return "preference"
    for kind in ("completion", "chat", "text"):
        if set(KIND_COLUMNS[kind]) <= present:
            return kind
    return None


def load_eval_data(path: str | Path, *, option: str = "--data") -> EvalData:
    """Load evaluation data and decide its kind from its columns.

    Args:
        path (`str | Path`): a `.json` / `.jsonl` / `.parquet` file, or a folder saved with `save_to_disk`
            (of a `DatasetDict`: its only split, else "test", "validation" or "train", in this order).
        option (`str`, defaults to "--data"): the option that named the path, for error messages.

    Returns:
        `EvalData`: the rows and their kind.

    Raises:
        `DataError`: unreadable or empty data, columns that fit no kind, or a value of the wrong type (the message
        names the row and column).

    Example:

    ```python
    >>> data = load_eval_data("heldout.jsonl")
    >>> data.kind, len(data.rows)
    ('text', 200)
    ```
    """
    path = Path(path)
    split = _split(path, option)
    table = load_table(path, option=option, split=split or "train")
    columns = list(table.column_names)
    kind = data_kind(columns)
    if kind is None:
        raise DataError(
            f"{option} {path}: found columns {', '.join(columns) or 'none'}; expected text, messages, "
            "prompt + completion, or prompt + chosen + rejected"
        )
    if len(table) == 0:
        raise DataError(f"{option} {path}: no rows")
    if kind == "preference":
        check_preference_schema(table, path, option=option)
    used = [column for column in KIND_COLUMNS[kind] if column in columns]
    rows = table.select_columns(used).to_list()
    expected = {column: value_kind(rows[0][column]) for column in used}
    if kind == "chat" and expected["messages"] != "conversational":
        raise DataError(f"{option} {path}: row 1, column 'messages': expected a list of {{role, content}} messages")
    if kind == "completion" and len(set(expected.values())) > 1:
        raise DataError(f"{option} {path}: prompt and completion hold different formats; use strings for both or messages for both")
    for number, row in enumerate(rows, 1):
        for column in used:
            found = value_kind(row[column])
            if found != expected[column] or found is None:
                want = "a string" if expected[column] == "standard" else "a list of {role, content} messages"
                raise DataError(
                    f"{option} {path}: row {number}, column {column!r}: expected {want}, got {_describe(row[column])}"
                )
    return EvalData(path=path, kind=kind, conversational=expected[used[-1]] == "conversational", rows=rows, split=split)


def _split(path: Path, option: str) -> str | None:
    """The split to read from a folder holding a saved `DatasetDict`: its only split, else the held-out one ("test",
    then "validation"), else "train"; None for a file or a single saved `Dataset`."""
    if not (path / DATASET_DICT_FILE).is_file():
        return None
    try:
        splits = json.loads((path / DATASET_DICT_FILE).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{option} {path}: unreadable {DATASET_DICT_FILE} ({e}); save the data again with save_to_disk") from e
    if len(splits) == 1:
        return splits[0]
    for split in ("test", "validation", "train"):
        if split in splits:
            return split
    raise DataError(f"{option} {path}: splits {', '.join(splits)}; save the split to evaluate on alone")


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, list):
        return "an empty list" if not value else "a list of something other than {role, content} messages"
    return f"{type(value).__name__} {value!r:.40}"
