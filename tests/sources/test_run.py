import os
from pathlib import Path

import pytest
import torch
from synthetic import make_run, save_weights

from bema_offline import DataError, UsageError
from bema_offline.sources import run as checkpoints
from bema_offline.sources.run import find_checkpoints, load_source, read_trainer_state, resolve_base_model


def make_dirs(root: Path, names):
    for name in names:
        (root / name).mkdir(parents=True)


def test_steps_sorted_numerically_and_narrowed(tmp_path):
    make_dirs(tmp_path, ["checkpoint-10", "checkpoint-9", "checkpoint-100", "runs", "bema"])
    assert list(find_checkpoints(tmp_path)) == [9, 10, 100]
    assert list(find_checkpoints(tmp_path, min_step=10)) == [10, 100]
    assert list(find_checkpoints(tmp_path, max_step=10)) == [9, 10]
    with pytest.raises(DataError, match="no checkpoint within --min-step 11 and --max-step 99"):
        find_checkpoints(tmp_path, min_step=11, max_step=99)
    with pytest.raises(DataError, match=r"no checkpoint within --max-step 5 \(found steps"):
        find_checkpoints(tmp_path, max_step=5)


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "no checkpoint-N folders"),
        (["checkpoint-400", "checkpoint-0400"], "are both step 400"),
        (["checkpoint-400", "checkpoint-final"], "without a step number"),
    ],
)
def test_bad_run_folders(tmp_path, names, message):
    make_dirs(tmp_path, names)
    with pytest.raises(DataError, match=message):
        find_checkpoints(tmp_path)


def test_missing_folder_and_link_loop(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        find_checkpoints(tmp_path / "nope")
    (tmp_path / "checkpoint-5").symlink_to(tmp_path / "checkpoint-5")
    with pytest.raises(DataError, match="link loop"):
        find_checkpoints(tmp_path)


def test_sharded_source_reads_the_index(tmp_path):
    tensors = {"a": torch.zeros(3), "b": torch.ones(2, 2), "c": torch.arange(4)}
    save_weights(tmp_path / "m", tensors, shards=2)
    source = load_source(tmp_path / "m", 7)
    assert sorted(source.tensors) == ["a", "b", "c"]
    assert source.tensors["b"].shape == (2, 2) and source.tensors["c"].dtype == "I64"
    assert len(source.files) == 2 and source.label.startswith("step 7")


def test_index_naming_a_missing_shard(tmp_path):
    save_weights(tmp_path / "m", {"a": torch.zeros(3), "b": torch.zeros(3)}, shards=2)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(DataError, match="model-00002-of-00002.safetensors.*missing"):
        load_source(tmp_path / "m", 1)


def test_bin_only_and_adapter_folders(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="save_safetensors=True"):
        load_source(tmp_path / "bin", 1)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(DataError, match="PEFT adapter"):
        load_source(tmp_path / "lora", 1)


def test_trainer_state(tmp_path):
    run_dir, _, _ = make_run(tmp_path, [5, 10])
    assert read_trainer_state(run_dir / "checkpoint-10") == {"global_step": 10, "max_steps": 10, "save_steps": 5, "num_train_epochs": None}
    (run_dir / "checkpoint-5" / "trainer_state.json").write_text("{nope")
    assert read_trainer_state(run_dir / "checkpoint-5") is None


def test_base_model_local_or_hub(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    assert resolve_base_model(tmp_path / "base") == tmp_path / "base"
    with pytest.raises(UsageError, match="no such local folder"):
        resolve_base_model(str(tmp_path / "missing"))
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "base")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_base_model("Qwen/Qwen2.5-0.5B") == tmp_path / "base"
    assert calls[0][0] == "Qwen/Qwen2.5-0.5B" and "*.safetensors" in calls[0][1]

    def offline(repo_id, allow_patterns):
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match="--base-model org/model: cannot fetch it from the Hub.*local folder"):
        resolve_base_model("org/model")


def test_side_files_that_are_fifos_or_devices_never_hang_a_run(tmp_path):
    """trainer_state.json and config.json are read bounded and only if regular: a FIFO or /dev/zero there is
    passed over (the run says nothing about its cadence, and the config comes from another folder)."""
    import os

    from bema_offline import BEMASchedule, average

    run_dir, base_dir, _ = make_run(tmp_path, [1, 2])
    newest = run_dir / "checkpoint-2"
    (newest / "trainer_state.json").unlink()
    os.mkfifo(newest / "trainer_state.json")
    (newest / "config.json").unlink()
    os.mkfifo(newest / "config.json")
    (run_dir / "checkpoint-1" / "trainer_state.json").unlink()
    (run_dir / "checkpoint-1" / "trainer_state.json").symlink_to("/dev/zero")
    assert checkpoints.read_trainer_state(newest) is None
    average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=1), base_model=base_dir)
    assert (tmp_path / "out" / "config.json").read_text() == (run_dir / "checkpoint-1" / "config.json").read_text()


def test_a_folder_with_both_model_safetensors_and_shards_is_read_as_transformers_loads_it(tmp_path):
    """transformers' from_pretrained loads model.safetensors when a folder also holds shards and an index: the
    average must read the same weights, and say that the shards were ignored."""
    single = {"w": torch.ones(4)}
    save_weights(tmp_path / "both", {"w": torch.full((4,), 2.0)}, shards=2)
    save_weights(tmp_path / "both", single)  # beside the shards and their index
    assert (tmp_path / "both" / "model.safetensors.index.json").is_file()
    source = load_source(tmp_path / "both", 1)
    assert source.tensors["w"].path.name == "model.safetensors"
    assert any("the shards were ignored" in note for note in source.notes)


def test_checkpoint_0_is_refused_with_the_fix(tmp_path):
    make_dirs(tmp_path, ["checkpoint-0", "checkpoint-4"])
    with pytest.raises(DataError, match="checkpoint-0: a checkpoint at step 0 is θ0.*pass it as --base-model"):
        find_checkpoints(tmp_path)


def test_a_run_that_saves_by_epoch_takes_its_cadence_from_the_checkpoints_not_the_unused_save_steps(tmp_path):
    """The Trainer records `save_steps` (500 by default) in trainer_state.json whatever `save_strategy` is: a run
    saved by epoch would replay with the wrong cadence if it were trusted."""
    from tiny_hf import make_tiny_qwen2, make_tokenizer
    from transformers import Trainer, TrainingArguments

    from bema_offline.sources.run import run_cadence

    tokenizer = make_tokenizer(tmp_path / "tok")
    model = make_tiny_qwen2(tmp_path / "base", tokenizer)
    ids = tokenizer("the cat sat on the mat")["input_ids"]
    data = [{"input_ids": ids, "labels": ids} for _ in range(6)]
    args = TrainingArguments(
        tmp_path / "run", num_train_epochs=3, per_device_train_batch_size=2, save_strategy="epoch", save_only_model=True,
        use_cpu=True, report_to=[], disable_tqdm=True, logging_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    assert sorted(find_checkpoints(tmp_path / "run")) == [3, 6, 9]
    assert read_trainer_state(tmp_path / "run" / "checkpoint-9")["save_steps"] == 500  # recorded, not used
    assert run_cadence(tmp_path / "run") == (3, "the spacing of the 3 checkpoints (trainer_state.json's save_steps 500 does not fit them: saved by epoch?)")


def test_a_weights_file_that_is_a_fifo_gets_one_line_and_never_blocks(tmp_path):
    run_dir, _, _ = make_run(tmp_path, [1])
    weights = run_dir / "checkpoint-1" / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(DataError, match="model.safetensors: not a regular file"):
        load_source(run_dir / "checkpoint-1", 1)
