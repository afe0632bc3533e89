"""Evaluation data: every file form loads, the columns decide the kind, and bad rows are one line naming row and column."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from bema_offline.errors import DataError
from bema_offline.eval.data import data_kind, load_eval_data

CHAT = [{"role": "user", "content": "cat"}, {"role": "assistant", "content": "dog"}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "columns, kind",
    [
        (["text"], "text"),
        (["messages", "id"], "chat"),
        (["prompt", "completion"], "completion"),
        (["prompt", "chosen", "rejected", "text"], "preference"),
        (["chosen", "rejected"], "preference"),
        (["question", "answer"], None),
    ],
)
def test_the_columns_decide_the_kind(columns: list[str], kind: str | None) -> None:
    assert data_kind(columns) == kind


@pytest.mark.parametrize("form", ["jsonl", "parquet", "saved", "saved-dict"])
def test_every_file_form_loads_with_only_the_columns_it_uses(tmp_path: Path, form: str) -> None:
    rows = [{"text": "the cat", "id": 1}, {"text": "the dog", "id": 2}]
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / {"jsonl": "d.jsonl", "parquet": "d.parquet", "saved": "saved", "saved-dict": "saved-dict"}[form]
    if form == "jsonl":
        _jsonl(path, rows)
    elif form == "parquet":
        table.to_parquet(path)
    elif form == "saved":
        table.save_to_disk(path)
    else:
        datasets.DatasetDict({"train": table.select([0]), "test": table}).save_to_disk(path)
    data = load_eval_data(path)
    assert (data.kind, data.conversational, data.rows) == ("text", False, [{"text": "the cat"}, {"text": "the dog"}])
    assert data.split == ("test" if form == "saved-dict" else None)  # the held-out split of a DatasetDict


def test_conversational_kinds(tmp_path: Path) -> None:
    assert load_eval_data(_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])).conversational
    prefs = [{"chosen": CHAT, "rejected": CHAT[:1] + [{"role": "assistant", "content": "fish"}]}]
    data = load_eval_data(_jsonl(tmp_path / "p.jsonl", prefs))
    assert (data.kind, data.conversational) == ("preference", True)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "a"}], "found columns question; expected text, messages, prompt + completion, or prompt + chosen + rejected"),
        ([{"text": "a"}, {"text": 3}], "row 2, column 'text': expected a string, got int 3"),
        ([{"text": "a"}, {"text": None}], "row 2, column 'text': expected a string, got nothing (null)"),
        ([{"messages": "hello"}], "row 1, column 'messages': expected a list of {role, content} messages"),
        ([{"prompt": "a", "completion": CHAT}], "prompt and completion hold different formats"),
        ([{"prompt": "a", "chosen": "b"}], "found columns prompt, chosen; expected text, messages"),
    ],
)
def test_bad_rows_are_one_line_naming_row_and_column(tmp_path: Path, rows: list[dict], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as error:
        load_eval_data(path)
    assert str(error.value).startswith(f"--data {path}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_splits_without_a_held_out_one_are_refused(tmp_path: Path) -> None:
    table = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"alpha": table, "beta": table}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match="splits alpha, beta; save the split to evaluate on alone"):
        load_eval_data(tmp_path / "saved")
