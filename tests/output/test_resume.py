"""`resume`: an interrupted run's finished shards are reused only when the plan is the same, and the result is the
same bytes as an uninterrupted run's. (Real SIGKILLs at every point are in `test_kill_points.py`.)"""

import os
from pathlib import Path

import pytest
from faultkit import snapshot
from synthetic import make_run

from bema_offline import BemaError, BEMASchedule, api, average, faults
from bema_offline.output.publish import lock_path, staging_path
from bema_offline.output.resume import DONE_FILE, PLAN_FILE

SCHEDULE = BEMASchedule(update_freq=1)
OPTIONS = {"save": ("ema", "bema"), "max_shard_size": "400B", "max_memory": 4096}


def model_files(folder: Path) -> dict[str, bytes]:
    """Every file, with the `created` time and the memory budget dropped from the provenance."""
    return snapshot(folder, drop_settings=("max_memory",))


def weight_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if "safetensors" in name}


@pytest.fixture
def run(tmp_path):
    """A run and its reference output; afterwards, the checkpoints and the base model must be unchanged."""
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3, 4])
    reference = tmp_path / "reference"
    average(run_dir, reference, schedule=SCHEDULE, base_model=base_dir, **OPTIONS)
    inputs = [base_dir, *sorted(run_dir.glob("checkpoint-*"))]
    before = tree_fingerprint(inputs)
    yield run_dir, base_dir, model_files(reference)
    after = tree_fingerprint(inputs)
    touched = {path for path in before if before[path][0] != after.get(path, (None,))[0]}
    assert not touched, f"input contents changed: {sorted(touched)}"


def tree_fingerprint(folders: list[Path]) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted(run_dir: Path, base_dir: Path, output: Path, monkeypatch, *, recorded: int, **changes) -> None:
    """Leave what a run killed right after recording its `recorded`-th finished shard leaves: its staging folder
    and a stale lock file."""
    monkeypatch.setattr(api, "discard", lambda path: None)  # a killed process cleans nothing up
    faults.arm("shard-done", recorded, "eio")
    try:
        with pytest.raises((BemaError, OSError)):
            average(run_dir, output, schedule=SCHEDULE, base_model=base_dir, **{**OPTIONS, **changes})
    finally:
        faults.disarm()
        monkeypatch.undo()
    lock_path(output).write_text("999999")  # what a killed run's lock file holds: a dead pid
    assert (staging_path(output) / PLAN_FILE).is_file()


def test_resume_reuses_finished_shards_and_gives_the_same_bytes(run, tmp_path, monkeypatch):
    run_dir, base_dir, reference = run
    output = tmp_path / "out"
    interrupted(run_dir, base_dir, output, monkeypatch, recorded=5)
    done = (staging_path(output) / DONE_FILE).read_text().split()
    # shards finish in order, in both outputs at nearly the same time: the 5th recorded is shard 3 of one output
    assert done == [f"{kind}/model-0000{i}-of-00003.safetensors" for i in (1, 2, 3) for kind in ("ema", "bema")][:5]
    result = average(run_dir, output, schedule=SCHEDULE, base_model=base_dir, resume=True, **{**OPTIONS, "max_memory": 10**6})
    assert result.reused_shards == 2 and result.resume_note is None  # shard 3 is done in one output only
    assert 0 < result.bytes_read < result.plan.bytes_to_read  # the reused shards' tensors were not read again
    assert model_files(output) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out", "reference", "run"]


@pytest.mark.parametrize(
    "change, what",
    [
        (lambda run_dir: os.utime(run_dir / "checkpoint-2" / "model.safetensors", ns=(1, 1)), "inputs changed"),
        (lambda run_dir: None, "settings"),
    ],
    ids=["input-touched", "dtype"],
)
def test_another_plan_starts_over(run, tmp_path, monkeypatch, change, what):
    run_dir, base_dir, reference = run
    output = tmp_path / "out"
    interrupted(run_dir, base_dir, output, monkeypatch, recorded=4, **({"dtype": "bfloat16"} if what == "settings" else {}))
    change(run_dir)
    result = average(run_dir, output, schedule=SCHEDULE, base_model=base_dir, resume=True, **OPTIONS)
    assert result.reused_shards == 0 and what in result.resume_note and "started over" in result.resume_note
    assert weight_files(model_files(output)) == weight_files(reference)  # the provenance records the new input times


def test_another_schedule_starts_over(run, tmp_path, monkeypatch):
    run_dir, base_dir, _ = run
    output = tmp_path / "out"
    interrupted(run_dir, base_dir, output, monkeypatch, recorded=4)
    other = BEMASchedule(update_freq=1, ema_power=0.3)
    result = average(run_dir, output, schedule=other, base_model=base_dir, resume=True, **OPTIONS)
    assert result.reused_shards == 0 and "schedules, outputs changed" in result.resume_note


def test_a_damaged_finished_shard_is_written_again(run, tmp_path, monkeypatch):
    run_dir, base_dir, reference = run
    output = tmp_path / "out"
    interrupted(run_dir, base_dir, output, monkeypatch, recorded=4)
    shard = staging_path(output) / "bema" / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    result = average(run_dir, output, schedule=SCHEDULE, base_model=base_dir, resume=True, **OPTIONS)
    assert result.reused_shards == 1  # shard 2 only: shard 1 no longer has its planned size
    assert model_files(output) == reference


def test_without_resume_leftovers_are_removed(run, tmp_path, monkeypatch):
    run_dir, base_dir, reference = run
    output = tmp_path / "out"
    interrupted(run_dir, base_dir, output, monkeypatch, recorded=4)
    result = average(run_dir, output, schedule=SCHEDULE, base_model=base_dir, **OPTIONS)
    assert result.removed_leftovers and result.reused_shards == 0
    assert model_files(output) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out", "reference", "run"]


def test_resume_with_nothing_to_resume(run, tmp_path):
    run_dir, base_dir, reference = run
    result = average(run_dir, tmp_path / "out", schedule=SCHEDULE, base_model=base_dir, resume=True, **OPTIONS)
    assert result.reused_shards == 0 and "no interrupted run to resume" in result.resume_note
    assert model_files(tmp_path / "out") == reference


def test_resume_files_never_reach_the_output(run, tmp_path):
    run_dir, base_dir, _ = run
    average(run_dir, tmp_path / "single", schedule=SCHEDULE, base_model=base_dir)  # staging is the model folder itself
    assert not list((tmp_path / "single").glob(".bema-*"))


@pytest.mark.parametrize("planted", ["model-00002-of-", DONE_FILE])
def test_links_planted_in_a_resumed_staging_folder_are_never_written_through(run, tmp_path, monkeypatch, planted):
    """A link named like a shard or the journal, left in the staging folder, is replaced, never followed; the result
    is still the reference bytes, and the file it pointed to is untouched."""
    run_dir, base_dir, reference = run
    out = tmp_path / "out"
    interrupted(run_dir, base_dir, out, monkeypatch, recorded=1)
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me")
    staging = staging_path(out)
    if planted == DONE_FILE:
        target = staging / DONE_FILE
        target.unlink()
    else:
        target = next(p for p in sorted((staging / "bema").glob("*.safetensors")) if p.name.startswith(planted))
        target.unlink()
    target.symlink_to(precious)
    try:
        average(run_dir, out, schedule=SCHEDULE, base_model=base_dir, resume=True, **OPTIONS)
    except BemaError as e:  # refusing is fine too, as long as nothing was written through the link
        assert "journal" in str(e) or "link" in str(e), e
    else:
        assert model_files(out) == reference
    assert precious.read_bytes() == b"keep me"


def test_a_resumed_staging_folder_holding_a_linked_subfolder_starts_over(run, tmp_path, monkeypatch):
    """A config's folder replaced by a link to another folder: the resumed run would create shards through it."""
    run_dir, base_dir, reference = run
    out = tmp_path / "out"
    interrupted(run_dir, base_dir, out, monkeypatch, recorded=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    staging = staging_path(out)
    (staging / "bema").rename(tmp_path / "moved")
    (staging / "bema").symlink_to(elsewhere)
    result = average(run_dir, out, schedule=SCHEDULE, base_model=base_dir, resume=True, **OPTIONS)
    assert "hold links" in result.resume_note and result.reused_shards == 0
    assert model_files(out) == reference and list(elsewhere.iterdir()) == []


def test_the_layout_digest_changes_with_any_tensor_name_shape_dtype_or_place(tmp_path):
    """The plan's fingerprint holds each source's tensor layout as one digest (a JSON tree of every tensor made
    planning 20,000 tensors cost a second); any change to where a tensor's bytes lie changes it."""
    from bema_offline.output.resume import layout_digest
    from bema_offline.sources.tensors import Extent, TensorInfo, WeightSource

    path = tmp_path / "model.safetensors"

    def source(**changes) -> WeightSource:
        spec = {"name": "w", "dtype": "F32", "shape": (2, 3), "extents": (Extent(path, 100, 0, 6),), **changes}
        tensors = {"a": TensorInfo("a", "BF16", (4,), (Extent(path, 92, 0, 4),)), spec["name"]: TensorInfo(**spec)}
        return WeightSource(1, tmp_path, tensors)

    reference = layout_digest(source())
    assert layout_digest(source()) == reference
    changed = [
        source(name="v"),
        source(dtype="F16"),
        source(shape=(3, 2)),
        source(extents=(Extent(path, 104, 0, 6),)),
        source(extents=(Extent(tmp_path / "other.safetensors", 100, 0, 6),)),
        source(extents=(Extent(path, 100, 0, 3), Extent(path, 200, 3, 6))),
    ]
    digests = [layout_digest(s) for s in changed]
    assert reference not in digests and len(set(digests)) == len(digests)
