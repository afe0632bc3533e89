"""`bema-offline dpo` run like the entry point: a real round, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from run_entry import run_cli
from tiny_dpo import make_preference_dataset, make_tiny_llama, make_tokenizer

from bema_offline.cli import cli
from bema_offline.output.fingerprint import folder_fingerprint

FAST = ["gradient_checkpointing=false", "use_cpu=true", "max_length=32", "report_to=none", "disable_tqdm=true"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_dpo")
    make_tiny_llama(root / "base", make_tokenizer(root / "tokenizer"))
    make_preference_dataset(8, seed=3).to_json(root / "prefs.jsonl")
    return root


@pytest.fixture(autouse=True)
def fast(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_round_from_the_command_line_then_its_average(base: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "round"
    args = ["dpo", "--ref-model", base / "base", "--dataset", base / "prefs.jsonl", "--output-dir", out,
            "--max-steps", 2, "--save-steps", 2, "--learning-rate", 1e-3, "--per-device-train-batch-size", 2,
            "--no-bf16", "--beta", 0.2, *[a for pair in FAST for a in ("--config-set", pair)]]  # fmt: skip
    code, stdout, stderr = run_cli(cli, args, capsys)
    assert code == 0, stderr
    assert f"reference {base / 'base'}: sha256 {folder_fingerprint(base / 'base')} (equal to its safetensors)" in stdout
    assert f"next: bema-average {out} --base-model {base / 'base'} --update-freq 2" in stdout
    record = json.loads((out / "bema_offline_dpo.json").read_text())
    assert record["dpo"]["beta"] == 0.2 and record["dpo"]["overrides"]["max_length"] == 32
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    code, _, stderr = run_cli(cli, ["average", out, "--base-model", base / "base", "--update-freq", 2, "-q"], capsys)
    assert code == 0, stderr
    assert (out / "bema-offline" / "model.safetensors").is_file()


def test_wrong_schema_is_one_line(base: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n')
    args = ["dpo", "--ref-model", base / "base", "--dataset", bad, "--output-dir", tmp_path / "out"]
    code, _, stderr = run_cli(cli, [*args, "--quiet"], capsys)
    assert code == 1
    assert stderr == f"error: --dataset {bad}: found columns question, answer; expected prompt, chosen, rejected (TRL's preference format: strings, or lists of {{role, content}} messages)\n"
    assert not (tmp_path / "out").exists()


def test_unknown_config_field_is_a_usage_error(base: Path, tmp_path: Path, capsys) -> None:
    args = ["dpo", "--ref-model", base / "base", "--dataset", base / "prefs.jsonl", "--output-dir", tmp_path / "o",
            "--config-set", "warmup_step=3"]  # fmt: skip
    code, _, stderr = run_cli(cli, args, capsys)
    assert code == 2 and stderr.startswith("error: --config-set warmup_step: DPOConfig has no such field; did you mean warmup_steps?")


def test_missing_extra_names_it(base: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(__import__("sys").modules, "trl", None)
    args = ["dpo", "--ref-model", base / "base", "--dataset", base / "prefs.jsonl", "--output-dir", tmp_path / "o"]
    code, _, stderr = run_cli(cli, args, capsys)
    assert code == 1 and stderr == "error: bema-offline dpo needs trl: pip install 'bema-offline[dpo]'\n"


def test_help_says_how_to_set_save_steps(capsys) -> None:
    code, stdout, _ = run_cli(cli, ["dpo", "--help"], capsys)
    assert code == 0
    text = " ".join(stdout.split())
    assert "Set it to the --update-freq of the next bema-average (save_steps = update_freq)" in text


def test_a_reference_without_tokenizer_files_is_one_line(base: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((base / "base" / name).read_bytes())
    args = ["dpo", "--ref-model", bare, "--dataset", base / "prefs.jsonl", "--output-dir", tmp_path / "round", "--max-steps", 2,
            "--no-bf16", *[a for pair in FAST for a in ("--config-set", pair)]]  # fmt: skip
    code, stdout, stderr = run_cli(cli, args, capsys)
    assert code == 1 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"error: {bare}: cannot load its tokenizer") and "copy the tokenizer files" in stderr


def test_malformed_json_data_is_one_line(base: Path, tmp_path: Path) -> None:
    """As a user sees it (a process: datasets logs through `logging`, which capsys does not capture)."""
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"\n')
    args = ["dpo", "--ref-model", base / "base", "--dataset", bad, "--output-dir", tmp_path / "round", "--no-bf16"]
    done = subprocess.run([sys.executable, "-m", "bema_offline", *map(str, args)], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if "accelerator" not in line]  # (DeepSpeed's import notice)
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: --dataset {bad}: cannot read it"), done.stderr
