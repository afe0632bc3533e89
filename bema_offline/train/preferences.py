"""Data files for DPO and evaluation: JSON, JSONL or Parquet files, or a `save_to_disk` folder.

`load_table` reads any of them (`bema-offline dpo --dataset` and `bema-offline eval --data` share it).
TRL's standard preference format has `prompt`, `chosen` and `rejected` columns, all strings ("standard") or all
lists of `{"role", "content"}` messages ("conversational"). `prompt` may be left out when `chosen` and `rejected`
hold whole conversations: TRL then extracts the shared start as the prompt. A wrong schema is one error line that
lists the columns found and the ones expected. `datasets` is imported only when data is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError, first_line

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
DATASET_SUFFIXES = (".json", ".jsonl", ".parquet")


def load_preference_dataset(path: str | Path):
    """Load a preference dataset in TRL's format and check its columns.

    Args:
        path (`str | Path`): a `.json` / `.jsonl` / `.parquet` file, or a folder saved with `save_to_disk`
            (a `DatasetDict` must have a "train" split).

    Returns:
        `(datasets.Dataset, str)`: the dataset and its format, "standard" (strings) or "conversational" (lists
        of `{"role", "content"}` messages).

    Raises:
        `DataError`: unreadable, empty, or not prompt/chosen/rejected.
    """
    loaded = load_table(path)
    return loaded, check_preference_schema(loaded, path)


def load_table(path: str | Path, *, option: str = "--dataset", split: str = "train"):
    """Load a data file or a saved `datasets` folder, whatever its columns.

    Args:
        path (`str | Path`): a `.json` / `.jsonl` / `.parquet` file, or a folder saved with `save_to_disk`.
        option (`str`, defaults to "--dataset"): the option that named the path, for error messages.
        split (`str`, defaults to "train"): the split to take from a saved `DatasetDict`.

    Returns:
        `datasets.Dataset`: the rows.

    Raises:
        `DataError`: no such path, or unreadable. `UsageError`: a file of another kind.

    Example:

    ```python
    >>> load_table("heldout.jsonl", option="--data").column_names
    ['text']
    ```
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    path = Path(path)
    if path.is_dir():
        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{option} {path}: not a folder written by datasets' save_to_disk ({first_line(e)})") from e
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                what = "training" if split == "train" else repr(split)
                raise DataError(f"{option} {path}: splits {', '.join(loaded)} and no {split!r}; save the {what} split alone")
            loaded = loaded[split]
    elif not path.is_file():
        raise DataError(f"{option} {path}: no such file or folder")
    elif path.suffix.lower() not in DATASET_SUFFIXES:
        raise UsageError(f"{option} {path}: use a .json, .jsonl or .parquet file, or a folder saved with save_to_disk")
    else:
        import datasets

        reader = Dataset.from_parquet if path.suffix.lower() == ".parquet" else Dataset.from_json
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log of a malformed file: ours is one line
        try:
            loaded = reader(str(path))
        except Exception as e:  # pyarrow and datasets raise many kinds for a malformed file
            raise DataError(f"{option} {path}: cannot read it ({first_line(e)})") from e
        finally:
            datasets.logging.set_verbosity(verbosity)
    return loaded


def check_preference_schema(dataset, source: str | Path, *, option: str = "--dataset") -> str:
    """Check that a dataset has TRL's preference columns, all strings or all conversations.

    `prompt` may be left out when `chosen` and `rejected` are whole conversations (TRL then extracts the prompt).
    `option` names the option that gave the data, in error messages.

    Returns:
        `str`: "standard" or "conversational".
    """
    columns = list(dataset.column_names)
    if "chosen" not in columns or "rejected" not in columns:
        raise DataError(
            f"{option} {source}: found columns {', '.join(columns) or 'none'}; expected prompt, chosen, rejected "
            "(TRL's preference format: strings, or lists of {role, content} messages)"
        )
    if len(dataset) == 0:
        raise DataError(f"{option} {source}: no rows")
    first = dataset[0]
    kinds = {column: value_kind(first[column]) for column in PREFERENCE_COLUMNS if column in columns}
    for column, kind in kinds.items():
        if kind is None:
            raise DataError(
                f"{option} {source}: column {column!r} holds {type(first[column]).__name__} values; expected strings "
                "or lists of {role, content} messages"
            )
    if len(set(kinds.values())) > 1:
        text = [c for c, k in kinds.items() if k == "standard"]
        chats = [c for c, k in kinds.items() if k == "conversational"]
        raise DataError(
            f"{option} {source}: {', '.join(text)} hold plain text but {', '.join(chats)} hold conversations; "
            "use one format for all columns"
        )
    kind = next(iter(kinds.values()))
    if "prompt" not in columns and kind == "standard":
        raise DataError(
            f"{option} {source}: found columns {', '.join(columns)}; plain-text data needs a prompt column "
            "(expected prompt, chosen, rejected)"
        )
    return kind


def value_kind(value: Any) -> str | None:
    """Whether `value` is text ("standard"), a non-empty list of `{"role", "content"}` messages ("conversational"), or
    neither (None)."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value):
        return "conversational"
    return None


