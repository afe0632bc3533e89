"""`verify` on the outputs of real LoRA runs (TRL DPO and SFT with a `peft.LoraConfig`, `tests/tiny_lora.py`): merged
model folders and PEFT adapter folders verify and recompute bit for bit, and every kind of damage is caught, in the
output's bytes, in its adapter config, in its record and in its sources."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_lora import lora_run, wide_lora_run

from bema_offline import BEMASchedule, DataError, average
from bema_offline.methods.windows import Uniform
from bema_offline.output.verify import check_adapter_folder, check_output_folder, verify

OUTPUTS = {
    # name: (run, options of average)
    "merged": ("dpo", {}),
    "merged-theta0-step-2-float64": ("sft", dict(schedule=BEMASchedule(update_freq=2, update_after=2), accum_dtype="float64")),
    "merged-factors-bf16": ("sft", dict(lora_average="factors", dtype="bfloat16")),
    "merged-dora": ("dora", {}),
    "merged-gpt2-sweep": ("gpt2", dict(schedule=[("bema", BEMASchedule(update_freq=2)), ("last2", Uniform(last=2))])),
    "adapter": ("dpo", dict(lora_output="adapter")),
    "adapter-rank-2": ("dpo", dict(lora_output="adapter", lora_rank=2)),
    "adapter-sft-factors-bf16": ("sft", dict(lora_output="adapter", lora_average="factors", dtype="bfloat16")),
    "adapter-gpt2-every-ema-bema": ("gpt2", dict(lora_output="adapter", save=("ema", "bema"), steps="every")),
}
MERGED = [name for name in OUTPUTS if name.startswith("merged")]
ADAPTERS = [name for name in OUTPUTS if name.startswith("adapter")]
Q_PROJ = "model.layers.0.self_attn.q_proj"
LORA_A = f"base_model.model.{Q_PROJ}.lora_A.weight"


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes() + str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """Every output of `OUTPUTS`, averaged once for this module (read-only: tests that damage one copy it)."""
    root = tmp_path_factory.mktemp("verify_lora")
    made = {}
    for name, (run_name, options) in OUTPUTS.items():
        run = lora_run(tmp_path_factory, run_name)
        average(run.run_dir, root / name, **{"schedule": BEMASchedule(update_freq=2), **options})
        made[name] = root / name
    return made


def copy_of(outputs: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(outputs[name], tmp_path / name))


def record_of(folder: Path) -> dict:
    return json.loads((folder / "bema_offline.json").read_text())


def edit_record(folder: Path, change) -> None:
    record = record_of(folder)
    change(record)
    (folder / "bema_offline.json").write_text(json.dumps(record))


def flip_bit(path: Path, name: str, element: int) -> None:
    """Flip the lowest bit of one float32 element of a tensor in place (the header is untouched)."""
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    entry = json.loads(data[8 : 8 + size])[name]
    assert entry["dtype"] == "F32"
    data[8 + size + entry["data_offsets"][0] + 4 * element] ^= 1
    path.write_bytes(bytes(data))


def forge_sha256(folder: Path) -> None:
    """Record the folder's current sha256 of every weight file, as a forger who knows the format would."""

    def change(record):
        for entry in record["output_files"]:
            path = folder / entry["name"]
            entry.update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())

    edit_record(folder, change)


# --- healthy outputs verify, recomputed bit for bit ----------------------------------------------------------------


@pytest.mark.parametrize("name", MERGED)
def test_merged_outputs_verify_and_every_tensor_recomputes_bit_for_bit(outputs, tmp_path_factory, name):
    run = lora_run(tmp_path_factory, OUTPUTS[name][0])
    before = tree_hash(run.run_dir), tree_hash(run.base_dir), tree_hash(outputs[name])
    reports = verify(outputs[name], recompute=10**6, seed=0, max_memory=2**20)
    assert len(reports) == (2 if "sweep" in name else 1)
    for report in reports:
        record = record_of(report.folder)
        assert not report.adapter and report.has_provenance and report.notes == []
        assert report.tensors == record["tensors"] and sorted(report.recomputed) == sorted(check_output_folder(report.folder))
        weights = {entry["step"] for entry in record["effective_weights"]}
        assert report.sources_checked == sorted(weights | {0})  # the base, with or without a weight of its own
    assert (tree_hash(run.run_dir), tree_hash(run.base_dir), tree_hash(outputs[name])) == before  # only read


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_outputs_verify_and_are_written_again_byte_for_byte(outputs, tmp_path_factory, name):
    run = lora_run(tmp_path_factory, OUTPUTS[name][0])
    before = tree_hash(run.run_dir), tree_hash(run.base_dir), tree_hash(outputs[name])
    reports = verify(outputs[name], recompute=1)
    assert len(reports) == (6 if "every" in name else 1)
    for report in reports:
        record = record_of(report.folder)
        assert report.adapter and report.shards == 1 and report.notes == []
        assert report.tensors == record["tensors"] and report.recomputed == sorted(check_adapter_folder(report.folder))
        assert [entry["name"] for entry in record["output_files"]] == ["adapter_config.json", "adapter_model.safetensors"]
        assert report.sources_checked == sorted({entry["step"] for entry in record["effective_weights"]} | {0})
    assert (tree_hash(run.run_dir), tree_hash(run.base_dir), tree_hash(outputs[name])) == before


def test_a_truncated_adapter_recomputes_whatever_the_thread_count_it_was_written_with(tmp_path_factory, tmp_path):
    """A float64 adapter truncated by SVD (600-row modules, whose QR takes another path on two threads): written in a
    process of two torch threads, written again by verify, byte for byte."""
    run = wide_lora_run(tmp_path_factory)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        average(run.run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), lora_output="adapter", lora_rank=5, dtype="float64")
        assert torch.get_num_threads() == 2  # (restored afterwards)
    finally:
        torch.set_num_threads(threads)
    (report,) = verify(tmp_path / "out", recompute=1)
    assert report.recomputed and record_of(tmp_path / "out")["lora"]["max_truncation_error"] > 0


# --- a flipped bit -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, file, tensor", [("merged", "model.safetensors", f"{Q_PROJ}.weight"), ("adapter", "adapter_model.safetensors", LORA_A)])
def test_a_flipped_bit_is_caught_by_its_sha256_and_when_forged_by_the_recomputation(outputs, tmp_path, name, file, tensor):
    folder = copy_of(outputs, name, tmp_path)
    flip_bit(folder / file, tensor, 37)
    with pytest.raises(DataError, match=f"{file}: its sha256 differs from the one recorded"):
        verify(folder)
    forge_sha256(folder)
    verify(folder)  # a forged record: every check but the recomputation passes
    recompute = 10**6 if name == "merged" else 1
    with pytest.raises(DataError, match=f"{file}: tensor '{tensor}' differs from its recomputation at element 37; .* do not use it"):
        verify(folder, recompute=recompute, seed=0)


def test_an_edited_adapter_config_is_caught_by_its_sha256_and_when_forged_by_the_recomputation(outputs, tmp_path):
    folder = copy_of(outputs, "adapter", tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 12
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 24}, indent=2, sort_keys=True) + "\n")
    with pytest.raises(DataError, match="adapter_config.json: its sha256 differs"):
        verify(folder)
    forge_sha256(folder)
    verify(folder)
    with pytest.raises(DataError, match="adapter_config.json: lora_alpha is 24 but 12 in its recomputation"):
        verify(folder, recompute=1)


def test_an_adapter_of_an_older_version_without_its_config_s_sha256_gets_a_note(outputs, tmp_path):
    folder = copy_of(outputs, "adapter", tmp_path)
    edit_record(folder, lambda r: r.update(output_files=[e for e in r["output_files"] if e["name"] != "adapter_config.json"]))
    (report,) = verify(folder, recompute=1)
    assert report.notes == [f"{folder / 'bema_offline.json'}: records no sha256 of adapter_config.json (an adapter of an older bema-offline), so its bytes were not checked against it"]


# --- a tampered record ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("merged", lambda r: r["effective_weights"][-1].update(weight=r["effective_weights"][-1]["weight"] + 1e-3), "the effective weights do not follow from the recorded method"),
        ("merged", lambda r: r.update(inputs=r["inputs"][1:]), "the inputs listed are not the base model and the steps with a weight"),
        ("merged", lambda r: r["lora"].update(output="adapter"), "describes a PEFT adapter .* but the folder is a model folder"),
        ("merged", lambda r: r["lora"].update(output="weights"), "malformed provenance record"),
        ("merged", lambda r: r["lora"].update(rank=0), "malformed provenance record"),
        ("merged", lambda r: r["lora"]["adapter"].update(lora_alpha=16), "lora.adapter.lora_alpha is 16 but the checkpoints it names say 12"),
        ("merged", lambda r: r.pop("lora"), "names the PEFT adapter .*checkpoint-2 as a source but has no lora entry"),
        ("adapter", lambda r: r.pop("lora"), "describes a model folder, but the folder is an adapter"),
        ("adapter", lambda r: r["lora"].update(rank=2), r"lora_A.weight' is F32 \[12, \d+\], but F32 \[2, \d+\] as planned"),
        ("adapter", lambda r: r["lora"]["ranks"].update({Q_PROJ: 4}), "lora.ranks are not the adapter's ranks"),
        ("adapter", lambda r: r.update(tensors=27), "records 27 tensors but the folder holds 28"),
        ("adapter-rank-2", lambda r: r["lora"]["truncation_errors"].update({Q_PROJ: 0.5}), "lora.truncation_errors differs from its recomputation"),
        ("adapter-rank-2", lambda r: r["lora"].update(rank=None), r"is F32 \[2, \d+\], but F32 \[12, \d+\] as planned"),
    ],
)
def test_a_tampered_record_is_refused(outputs, tmp_path, name, change, message):
    folder = copy_of(outputs, name, tmp_path)
    edit_record(folder, change)
    with pytest.raises(DataError, match=message):
        verify(folder, recompute=1)


def test_a_merged_output_recorded_with_the_other_lora_average_fails_its_recomputation(outputs, tmp_path):
    """The options that only the bits show (exact or factors): the tensors are recomputed as recorded, and differ."""
    folder = copy_of(outputs, "merged", tmp_path)
    edit_record(folder, lambda r: r["lora"].update(average="factors"))
    verify(folder)
    with pytest.raises(DataError, match="differs from its recomputation"):
        verify(folder, recompute=10**6, seed=0)


# --- its sources -------------------------------------------------------------------------------------------------


def test_sources_changed_or_gone(tmp_path_factory, tmp_path):
    """A copy of the run: a checkpoint touched is a note; rewritten, its recomputation differs; gone, a note, and
    the recomputation is refused."""
    dpo = lora_run(tmp_path_factory, "dpo")
    run_dir = Path(shutil.copytree(dpo.run_dir, tmp_path / "run"))
    average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), base_model=dpo.base_dir, lora_output="adapter")
    weights = run_dir / "checkpoint-4" / "adapter_model.safetensors"
    os.utime(weights, ns=(1, 1))
    (report,) = verify(tmp_path / "out", recompute=1)
    assert report.notes == [f"{tmp_path / 'out'}: 1 source files changed since the output was made (e.g. {weights})"]
    tensors = load_file(weights)
    tensors[LORA_A] = tensors[LORA_A] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    verify(tmp_path / "out")  # the output itself is intact
    # the lossless adapter stacks [A₂; A₄; A₆] (r=4 rows each, 32 columns): checkpoint-4's A starts at element 4·32
    with pytest.raises(DataError, match=f"tensor '{LORA_A}' differs from its recomputation at element 128"):
        verify(tmp_path / "out", recompute=1)
    shutil.rmtree(run_dir / "checkpoint-4")
    (report,) = verify(tmp_path / "out")
    assert report.sources_checked == [] and f"1 source folders are gone (e.g. {run_dir / 'checkpoint-4'})" in report.notes[0]
    with pytest.raises(DataError, match="cannot recompute, some sources named in bema_offline.json are gone"):
        verify(tmp_path / "out", recompute=1)


def test_a_base_model_that_no_longer_fits_the_adapter(outputs, tmp_path_factory, tmp_path):
    """The record names a base whose tensors now have other shapes: the adapter no longer fits it."""
    gpt2 = lora_run(tmp_path_factory, "gpt2")
    folder = copy_of(outputs, "adapter", tmp_path)
    edit_record(folder, lambda r: r["inputs"][0].update(folder=str(gpt2.base_dir)))
    with pytest.raises(DataError, match="but the base model .* has no tensor"):
        verify(folder)


# --- the light check of an adapter folder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: save_file({"x": torch.zeros(1)}, f / "extra.safetensors"), "extra.safetensors: a safetensors file beside the adapter's"),
        (lambda f: save_file({"x": torch.zeros(1)}, f / "model.safetensors"), "holds both a PEFT adapter .* and model weights .*model.safetensors"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:-4]), "adapter_model.safetensors: tensor .* ends at byte 52664 but the file has 52660 bytes; the file is truncated"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes() + b"\0" * 4), "but its header describes"),
        (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), "adapter_model.bin: a pickled adapter"),
        (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "IA3"}'), "a IA3 adapter; only LoRA adapters"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "has adapter_config.json but no adapter_model.safetensors"),
    ],
)
def test_damaged_adapter_folders(outputs, tmp_path, damage, message):
    folder = copy_of(outputs, "adapter", tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=message):
        verify(folder)


def test_a_checkpoint_of_the_run_gets_the_structural_checks(tmp_path_factory):
    run = lora_run(tmp_path_factory, "sft")
    (report,) = verify(run.checkpoint(4))
    assert report.adapter and not report.has_provenance and report.tensors == len(check_adapter_folder(run.checkpoint(4)))
    with pytest.raises(DataError, match="no bema_offline.json, so the sources to recompute from are unknown"):
        verify(run.checkpoint(4), recompute=1)
