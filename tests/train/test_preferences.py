"""Preference data: every supported form loads; a wrong schema is one line naming what was found and expected."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from bema_offline.errors import DataError, UsageError
from bema_offline.train.preferences import load_preference_dataset


@pytest.fixture(autouse=True)
def local_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


ROWS = [{"prompt": "cat", "chosen": " dog", "rejected": " fish"}, {"prompt": "red", "chosen": " blue", "rejected": " sun"}]
CHAT = [
    {
        "prompt": [{"role": "user", "content": "cat"}],
        "chosen": [{"role": "assistant", "content": "dog"}],
        "rejected": [{"role": "assistant", "content": "fish"}],
    }
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "parquet", "saved", "saved-dict"])
def test_every_dataset_form_loads(tmp_path: Path, kind: str) -> None:
    data = datasets.Dataset.from_list(ROWS)
    path = {
        "jsonl": tmp_path / "p.jsonl",
        "json-array": tmp_path / "p.json",
        "parquet": tmp_path / "p.parquet",
        "saved": tmp_path / "saved",
        "saved-dict": tmp_path / "saved-dict",
    }[kind]
    if kind == "jsonl":
        _write_jsonl(path, ROWS)
    elif kind == "json-array":
        path.write_text(json.dumps(ROWS))
    elif kind == "parquet":
        data.to_parquet(path)
    elif kind == "saved":
        data.save_to_disk(path)
    else:
        datasets.DatasetDict({"train": data, "test": data}).save_to_disk(path)
    loaded, data_format = load_preference_dataset(path)
    assert data_format == "standard" and loaded.to_list() == ROWS


def test_conversational_and_implicit_prompt_formats(tmp_path: Path) -> None:
    assert load_preference_dataset(_write_jsonl(tmp_path / "c.jsonl", CHAT))[1] == "conversational"
    implicit = [{"chosen": CHAT[0]["prompt"] + CHAT[0]["chosen"], "rejected": CHAT[0]["prompt"] + CHAT[0]["rejected"]}]
    assert load_preference_dataset(_write_jsonl(tmp_path / "i.jsonl", implicit))[1] == "conversational"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "a", "label": 1}], "found columns text, label; expected prompt, chosen, rejected"),
        ([{"prompt": "a", "chosen": "b", "answer": "c"}], "found columns prompt, chosen, answer; expected prompt, chosen, rejected"),
        ([{"chosen": "b", "rejected": "c"}], "plain-text data needs a prompt column"),
        ([{"prompt": "a", "chosen": 1, "rejected": 2}], "column 'chosen' holds int values; expected strings"),
        (
            [{"prompt": "a", "chosen": CHAT[0]["chosen"], "rejected": CHAT[0]["rejected"]}],
            "prompt hold plain text but chosen, rejected hold conversations; use one format",
        ),
    ],
)
def test_wrong_schemas_say_what_was_found_and_expected(tmp_path: Path, rows: list[dict], message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_preference_dataset(path)
    assert str(error.value).startswith(f"--dataset {path}: ")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_dataset_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_preference_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(UsageError, match="use a .json, .jsonl or .parquet file, or a folder saved with save_to_disk"):
        load_preference_dataset(tmp_path / "p.csv")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "chosen"\n')
    with pytest.raises(DataError, match="cannot read it"):
        load_preference_dataset(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError):
        load_preference_dataset(tmp_path / "empty.jsonl")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "nosplit")
    with pytest.raises(DataError, match="splits test and no 'train'"):
        load_preference_dataset(tmp_path / "nosplit")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a folder written by datasets' save_to_disk"):
        load_preference_dataset(tmp_path / "plain")
