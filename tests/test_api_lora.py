"""`bema_offline.average` on LoRA runs: the library entry point, `--resume` after a kill, and what the resume
fingerprint covers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_lora import assert_equals_peft, lora_run, quiet

from bema_offline import BEMASchedule, average
from bema_offline.methods.windows import Uniform


def weights_of(folder: Path) -> dict[int, float]:
    return {e["step"]: e["weight"] for e in json.loads((folder / "bema_offline.json").read_text())["effective_weights"]}


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_average_writes_merged_and_adapter_outputs(tmp_path_factory, tmp_path):
    from peft import PeftModel

    run = lora_run(tmp_path_factory, "sft")
    result = average(run.run_dir, tmp_path / "merged", schedule=Uniform(last=2))
    assert result.written and result.plan.lora is not None and result.plan.lora.output == "merged"
    assert weights_of(tmp_path / "merged") == {4: 0.5, 6: 0.5}
    assert_equals_peft(run, load_file(tmp_path / "merged" / "model.safetensors"), {4: 0.5, 6: 0.5})
    configs = [("bema", BEMASchedule(update_freq=2)), ("last2", Uniform(last=2))]
    result = average(run.run_dir, tmp_path / "adapters", schedule=configs, base_model=run.base_dir, lora_output="adapter", lora_rank=3)
    assert [o.path.name for o in result.outputs] == ["bema", "last2"]
    for out in result.outputs:
        record = json.loads((out.path / "bema_offline.json").read_text())
        assert set(record["lora"]["ranks"].values()) <= {2, 3} and record["lora"]["max_truncation_error"] > 0
        model = quiet(PeftModel.from_pretrained, run.load_base(), out.path)
        assert {p.name for p in out.path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        assert model.peft_config["default"].r == 3


def killed_average(run_dir: Path, out: Path, fault: str, **options) -> int:
    """`average(...)` in a process killed at a fault point (`bema_offline.faults`); returns its exit status."""
    code = (
        "from bema_offline import BEMASchedule, average\n"
        f"average({str(run_dir)!r}, {str(out)!r}, schedule=BEMASchedule(update_freq=2), **{options!r})"
    )
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "BEMA_OFFLINE_FAULT": fault}, capture_output=True).returncode


def test_resume_after_a_kill(tmp_path_factory, tmp_path):
    """Killed once two shards were done: --resume reuses them and the output is byte-identical to a fresh run's; a
    change of a LoRA option makes the leftovers unusable."""
    run = lora_run(tmp_path_factory, "dpo")
    out = tmp_path / "out"
    assert killed_average(run.run_dir, out, "shard-done:2:kill", max_shard_size="24KB") == -9
    assert not out.exists() and list(tmp_path.glob(".out.bema-*"))
    changed = average(run.run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), max_shard_size="24KB", resume=True, lora_average="factors")
    assert changed.reused_shards == 0 and "lora changed" in changed.resume_note
    assert killed_average(run.run_dir, tmp_path / "again", "shard-done:2:kill", max_shard_size="24KB") == -9
    resumed = average(run.run_dir, tmp_path / "again", schedule=BEMASchedule(update_freq=2), max_shard_size="24KB", resume=True)
    assert resumed.reused_shards == 2 and resumed.bytes_read < resumed.plan.bytes_to_read
    average(run.run_dir, tmp_path / "fresh", schedule=BEMASchedule(update_freq=2), max_shard_size="24KB")
    assert len(shard_bytes(tmp_path / "fresh")) > 2 and shard_bytes(tmp_path / "again") == shard_bytes(tmp_path / "fresh")


def test_an_adapter_output_is_written_again_on_resume(tmp_path_factory, tmp_path):
    run = lora_run(tmp_path_factory, "dpo")
    out = tmp_path / "out"
    assert killed_average(run.run_dir, out, "sidecars:1:kill", lora_output="adapter") == -9
    result = average(run.run_dir, out, schedule=BEMASchedule(update_freq=2), lora_output="adapter", resume=True)
    assert result.resume_note is None and result.reused_shards == 0
    average(run.run_dir, tmp_path / "fresh", schedule=BEMASchedule(update_freq=2), lora_output="adapter")
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "fresh" / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((tmp_path / "fresh" / "adapter_config.json").read_text())


@pytest.mark.parametrize("option", [dict(lora_rank=0), dict(lora_output="lora"), dict(lora_average="mean")])
def test_bad_options_through_the_library(tmp_path_factory, tmp_path, option):
    from bema_offline.errors import UsageError

    with pytest.raises(UsageError, match="--lora-"):
        average(lora_run(tmp_path_factory, "dpo").run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), **option)


def test_an_adapter_output_does_not_depend_on_the_budget(tmp_path_factory, tmp_path):
    """The SFT run trains lm_head in full (modules_to_save): with 4 KiB its copies are averaged a few rows at a time."""
    from bema_offline.output.adapter import full_block_rows

    run = lora_run(tmp_path_factory, "sft")
    results = {}
    for budget in ("4KiB", "512MiB"):
        result = average(run.run_dir, tmp_path / budget, schedule=BEMASchedule(update_freq=2), lora_output="adapter", max_memory=budget)
        results[budget] = (tmp_path / budget / "adapter_model.safetensors").read_bytes()
    lora = result.plan.lora
    rows = lora.base.tensors["model.embed_tokens.weight"].shape[0]  # (the tied head's θ0)
    assert full_block_rows(lora.run, lora.base, 4096) < 10 < rows < full_block_rows(lora.run, lora.base, 512 * 2**20)
    assert results["4KiB"] == results["512MiB"]
