"""The iterative-DPO loop for LoRA users: round 1 is a TRL DPO run of a LoRA adapter (`tests/tiny_lora.py`),
`bema-average` merges its BEMA into a full model, and round 2 trains a new LoRA policy on that model against it as
the separate, verified reference; `bema-average` then finds round 2's base (the merged BEMA) by itself."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import make_preference_dataset
from tiny_lora import LoraRun, assert_equals_peft, lora_run

from bema_offline import BEMASchedule, average
from bema_offline.cli import _run, cli
from bema_offline.output.fingerprint import folder_fingerprint
from bema_offline.train.dpo import lora_config, train_dpo

FAST = {
    "gradient_checkpointing": False, "use_cpu": True, "max_length": 32, "logging_steps": 6, "report_to": [],
    "disable_tqdm": True, "lr_scheduler_type": "constant", "seed": 0, "dataloader_num_workers": 0,
}  # fmt: skip


def run_cli(command, args: list, capsys) -> tuple[int, str, str]:
    """Run `command` with `args` as the entry point does. Returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        _run(command, [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def round1(tmp_path_factory) -> tuple[Path, Path]:
    """Round 1's merged BEMA (a full model folder) and a preference file."""
    run = lora_run(tmp_path_factory, "dpo")
    root = tmp_path_factory.mktemp("dpo_lora")
    average(run.run_dir, root / "round1-bema", schedule=BEMASchedule(update_freq=2))
    make_preference_dataset(12, seed=5).to_json(root / "prefs.jsonl")
    return root / "round1-bema", root / "prefs.jsonl"


@pytest.fixture(autouse=True)
def fast(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_lora_round_against_the_merged_bema_of_a_lora_round(round1, tmp_path):
    from transformers import Qwen2ForCausalLM

    bema, prefs = round1
    lines = []
    result = train_dpo(
        bema, prefs, tmp_path / "round2", lora=lora_config(r=4, lora_alpha=8, target_modules="all-linear"), max_steps=6,
        save_steps=2, learning_rate=2e-2, per_device_train_batch_size=2, bf16=False, config_overrides=FAST, log=lines.append,
    )
    assert result.reference_fingerprint == folder_fingerprint(bema)
    assert any(line.startswith("policy: a LoRA adapter (r=4, lora_alpha=8)") for line in lines)
    assert result.checkpoints == [2, 4, 6] and result.record["lora"]["r"] == 4
    for step in result.checkpoints:
        folder = tmp_path / "round2" / f"checkpoint-{step}"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(bema) and config["r"] == 4 and not (folder / "model.safetensors").exists()
    # the next average finds round 2's base, the merged BEMA, in the adapter config
    out = tmp_path / "round2-bema"
    averaged = average(tmp_path / "round2", out, schedule=BEMASchedule(update_freq=2))
    assert averaged.plan.lora.base.folder == bema
    weights = {e["step"]: e["weight"] for e in json.loads((out / "bema_offline.json").read_text())["effective_weights"]}
    round2 = LoraRun("round2", tmp_path / "round2", bema, Qwen2ForCausalLM)
    assert_equals_peft(round2, load_file(out / "model.safetensors"), weights)
    assert not torch.equal(load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"], load_file(bema / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])


def test_lora_options_from_the_command_line(round1, tmp_path, capsys):
    bema, prefs = round1
    out = tmp_path / "round"
    fast = ["gradient_checkpointing=false", "use_cpu=true", "max_length=32", "report_to=none", "disable_tqdm=true"]
    args = ["dpo", "--ref-model", bema, "--dataset", prefs, "--output-dir", out, "--max-steps", 2, "--save-steps", 2,
            "--per-device-train-batch-size", 2, "--no-bf16", "--lora-r", 2, "--lora-alpha", 4, "--lora-target-modules",
            "q_proj,v_proj", "--lora-set", "use_rslora=true", *[a for pair in fast for a in ("--config-set", pair)]]  # fmt: skip
    code, stdout, stderr = run_cli(cli, args, capsys)
    assert code == 0, stderr
    config = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 4, True)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    record = json.loads((out / "bema_offline_dpo.json").read_text())
    assert sorted(record["lora"]["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lora-alpha", "4"], "configure the adapter that --lora-r asks for; add --lora-r"),
        (["--lora-r", "2", "--lora-set", "use_rslor=true"], "--lora-set use_rslor: LoraConfig has no such field; did you mean use_rslora?"),
        (["--lora-r", "2", "--lora-set", "r=3"], "--lora-set r: use --lora-r instead"),
        (["--lora-r", "2", "--lora-set", "use_dora=maybe"], "--lora-set use_dora=maybe: expected"),
    ],
)
def test_lora_option_errors_are_one_line(round1, tmp_path, capsys, options, message):
    bema, prefs = round1
    code, _, stderr = run_cli(cli, ["dpo", "--ref-model", bema, "--dataset", prefs, "--output-dir", tmp_path / "o", *options], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not (tmp_path / "o").exists()
