"""`scripts/iterative_dpo.py`: two real rounds (TRL DPO, then bema-average), and a consistent rounds.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch
from tiny_dpo import make_preference_dataset, make_tiny_llama, make_tokenizer

from bema_offline.output.fingerprint import folder_fingerprint

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "iterative_dpo.py"
FAST = ["gradient_checkpointing=false", "use_cpu=true", "max_length=32", "report_to=none", "disable_tqdm=true", "seed=0"]


def load_script():
    spec = importlib.util.spec_from_file_location("iterative_dpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    make_tiny_llama(tmp_path / "base", make_tokenizer(tmp_path / "tokenizer"))
    make_preference_dataset(12, seed=4).to_json(tmp_path / "prefs.jsonl")
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("policy_init", ["reference", "last"])
def test_two_rounds_and_their_record(setup: Path, capsys, policy_init: str) -> None:
    work = setup / "iter"
    args = ["--policy-init", policy_init, "--base-model", setup / "base", "--dataset", setup / "prefs.jsonl", "--rounds", 2, "--workdir", work,
            "--save-steps", 2, "--max-steps", 5, "--learning-rate", 1e-3, "--per-device-train-batch-size", 2,
            "--no-bf16", *[a for pair in FAST for a in ("--config-set", pair)]]  # fmt: skip
    assert load_script().main([str(a) for a in args]) == 0, capsys.readouterr().err
    record = json.loads((work / "rounds.json").read_text())

    assert record["base_model"] == {"path": str(setup / "base"), "fingerprint": folder_fingerprint(setup / "base")}
    assert record["schedule"]["update_freq"] == 2 and record["schedule"]["update_after"] == 0
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    first, second = record["rounds"]
    # round 1: reference and policy are the base; round 2: the reference is round 1's BEMA, and the policy too
    # (policy_init "reference") or round 1's last checkpoint (policy_init "last")
    assert first["reference"] == record["base_model"]
    assert first["policy"] == record["base_model"]
    assert second["reference"] == {"path": first["average"]["path"], "fingerprint": first["average"]["fingerprint"]}
    if policy_init == "reference":
        assert second["policy"] == second["reference"]
    else:
        last = Path(first["output_dir"]) / "checkpoint-5"
        assert second["policy"] == {"path": str(last), "fingerprint": folder_fingerprint(last)}
    assert first["average"]["fingerprint"] != record["base_model"]["fingerprint"]
    for entry in record["rounds"]:
        run_dir, bema_dir = Path(entry["output_dir"]), Path(entry["average"]["path"])
        found = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
        assert entry["checkpoints"] == found == [2, 4, 5]  # the final step is saved too
        assert entry["global_step"] == 5 and entry["dpo"]["save_steps"] == 2
        # every checkpoint on the save grid is an update step; the last one (5) is off the grid and not used
        assert entry["average"]["update_steps"] == [2, 4] and entry["average"]["ignored_steps"] == [5]
        assert entry["average"]["step"] == 4 and entry["average"]["kind"] == "bema"
        weights = entry["average"]["effective_weights"]
        assert list(weights) == ["0", "2", "4"] and abs(sum(weights.values()) - 1) < 1e-12
        assert entry["average"]["theta0"] == entry["policy"]["path"]
        assert entry["average"]["fingerprint"] == folder_fingerprint(bema_dir)  # the files are what was recorded
        assert entry["reference"]["fingerprint"] == folder_fingerprint(entry["reference"]["path"])
        provenance = json.loads((bema_dir / "bema_offline.json").read_text())
        assert provenance["base_model"] == entry["policy"]["path"]  # θ0 of the average is where the round started
        round_record = json.loads((run_dir / "bema_offline_dpo.json").read_text())
        assert round_record["reference"]["fingerprint"] == entry["reference"]["fingerprint"]
        assert round_record["checkpoints"] == entry["checkpoints"]
    out = capsys.readouterr().out
    assert f"done: 2 rounds; the last BEMA is {work / 'round-2-bema'}" in out


def test_bad_arguments_are_one_line(setup: Path, capsys) -> None:
    args = ["--base-model", setup / "base", "--dataset", setup / "prefs.jsonl", "--dataset", setup / "prefs.jsonl",
            "--dataset", setup / "prefs.jsonl", "--rounds", 2, "--workdir", setup / "iter", "--save-steps", 2]  # fmt: skip
    assert load_script().main([str(a) for a in args]) == 2
    assert capsys.readouterr().err == "error: --dataset given 3 times; give it once, or once per round (2)\n"
    assert not (setup / "iter").exists()
