"""`bema_offline.train.checkpoints`: where a killed round resumes from, and the optimizer state kept in the newest
checkpoint only. Checkpoint folders are laid out here as the Trainer writes them (`trainer_state.json` last); the
real Trainer's are exercised in `test_iterate.py`."""

from __future__ import annotations

import json
from pathlib import Path

from bema_offline.train.checkpoints import adapter_fingerprint, is_complete_checkpoint, prepare_resume, prune_resume_state

STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


def checkpoint(run_dir: Path, step: int, *, state: bool = True, trainer_state: str | None = None) -> Path:
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    for name in STATE if state else ():
        (folder / name).write_bytes(b"state")
    text = json.dumps({"global_step": step}) if trainer_state is None else trainer_state
    if text:
        (folder / "trainer_state.json").write_text(text)
    return folder


def test_a_killed_round_resumes_from_its_newest_complete_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "round-1"
    checkpoint(run_dir, 2, state=False)
    newest = checkpoint(run_dir, 4)
    checkpoint(run_dir, 6, trainer_state='{"global_st')  # killed while writing its trainer_state.json
    checkpoint(run_dir, 8, trainer_state="")  # killed before it
    assert [is_complete_checkpoint(run_dir / f"checkpoint-{s}") for s in (2, 4, 6, 8)] == [True, True, False, False]
    assert prepare_resume(run_dir) == newest
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_without_a_resumable_checkpoint_the_round_starts_afresh(tmp_path: Path) -> None:
    run_dir = tmp_path / "round-1"
    checkpoint(run_dir, 2, state=False)
    checkpoint(run_dir, 4, trainer_state="")
    assert prepare_resume(run_dir) is None and not run_dir.exists()
    assert prepare_resume(tmp_path / "never-started") is None


def test_only_the_newest_checkpoint_keeps_the_optimizer_state(tmp_path: Path) -> None:
    run_dir = tmp_path / "round-1"
    for step in (2, 4, 6):
        checkpoint(run_dir, step)
    prune_resume_state(run_dir, newest=6)
    for step, kept in [(2, False), (4, False), (6, True)]:
        folder = run_dir / f"checkpoint-{step}"
        assert all((folder / name).exists() == kept for name in STATE)
        assert (folder / "model.safetensors").is_file() and (folder / "trainer_state.json").is_file()


def test_a_lora_round_resumes_from_an_adapter_checkpoint(tmp_path: Path) -> None:
    """A LoRA round's checkpoints hold an adapter instead of the model's weights; its fingerprint covers the adapter's
    config and weights, byte for byte."""
    run_dir = tmp_path / "round-1"
    for step in (2, 4):
        folder = checkpoint(run_dir, step)
        (folder / "model.safetensors").rename(folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text('{"r": 4}')
    (run_dir / "checkpoint-4" / "adapter_model.safetensors").unlink()  # killed before the Trainer wrote it
    assert [is_complete_checkpoint(run_dir / f"checkpoint-{s}") for s in (2, 4)] == [True, False]
    assert prepare_resume(run_dir) == run_dir / "checkpoint-2" and not (run_dir / "checkpoint-4").exists()
    folder = run_dir / "checkpoint-2"
    before = adapter_fingerprint(folder)
    (folder / "optimizer.pt").write_bytes(b"other state")  # not the adapter
    assert adapter_fingerprint(folder) == before
    for name, content in [("adapter_model.safetensors", b"weightz"), ("adapter_config.json", '{"r": 8}'.encode())]:
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(content)
        assert adapter_fingerprint(folder) != before
        (folder / name).write_bytes(original)
    assert adapter_fingerprint(folder) == before
