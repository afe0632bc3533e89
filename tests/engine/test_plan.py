"""The plan reads the run's checkpoint names, never every step: what is missing, pruned or stray gets a hint that
fits, and the cadence comes from the run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from synthetic import make_run

from bema_offline import BEMASchedule, DataError, UsageError, average
from bema_offline.sources.run import run_cadence


def test_a_stray_far_checkpoint_costs_nothing(tmp_path: Path) -> None:
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4])
    (run_dir / "checkpoint-1000000000000").mkdir()  # an empty stray folder, far away
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"update steps 6, 8, .* \(499999999997 in all\) have no checkpoint.*--max-step 4"):
        average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), base_model=base_dir, dry_run=True)
    assert time.perf_counter() - started < 2
    result = average(run_dir, tmp_path / "o", schedule=BEMASchedule(update_freq=2), base_model=base_dir, max_step=4, dry_run=True)
    assert result.plan.schedules[0].update_steps == [2, 4]


def test_allow_missing_counts_every_skipped_step_and_lists_the_first(tmp_path: Path) -> None:
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 20_000])
    result = average(run_dir, tmp_path / "o", schedule=BEMASchedule(update_freq=2), base_model=base_dir, allow_missing=True, dry_run=True)
    run = result.plan.schedules[0]
    assert run.update_steps == [2, 4, 20_000]
    assert run.missing_count == 10_000 - 3 and run.missing_steps[:3] == [6, 8, 10] and len(run.missing_steps) == 100


def test_a_pruned_run_is_offered_an_exact_replay_from_its_oldest_checkpoint(tmp_path: Path) -> None:
    run_dir, base_dir, _ = make_run(tmp_path, [300, 400, 500])  # save_total_limit=3 deleted 100 and 200
    with pytest.raises(DataError) as failure:
        average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=100), base_model=base_dir, dry_run=True)
    message = str(failure.value)
    assert "update steps 100, 200 have no checkpoint" in message
    assert "--update-after 300 (the older checkpoints were deleted, e.g. by save_total_limit)" in message
    assert "--allow-missing" in message and "θ0 would then weigh" in message
    assert "--update-freq" not in message  # the cadence is right already
    result = average(run_dir, tmp_path / "o", schedule=BEMASchedule(update_freq=100, update_after=300), dry_run=True)
    assert result.plan.schedules[0].update_steps == [400, 500]


def test_the_hint_never_repeats_the_value_already_passed(tmp_path: Path) -> None:
    run_dir, base_dir, _ = make_run(tmp_path, [100, 300, 400])  # 200 lost, whatever the start
    with pytest.raises(DataError) as failure:
        average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=100, update_after=100), dry_run=True)
    assert "--update-after 100" not in str(failure.value)
    run_dir, base_dir, _ = make_run(tmp_path / "b", [3, 6, 9])
    with pytest.raises(DataError, match="checkpoints are 3 steps apart, so try --update-freq 3"):
        average(run_dir, tmp_path / "o", schedule=BEMASchedule(update_freq=2), base_model=base_dir, dry_run=True)


def test_a_truncated_newest_checkpoint_gets_the_max_step_hint(tmp_path: Path) -> None:
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6])
    weights = run_dir / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(DataError, match="killed while saving checkpoint-6, leave it out with --max-step 4"):
        average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), base_model=base_dir, dry_run=True)


def test_the_cadence_comes_from_the_run(tmp_path: Path) -> None:
    run_dir, _, _ = make_run(tmp_path, [5, 10, 15])  # trainer_state.json says save_steps 5
    assert run_cadence(run_dir) == (5, "the run's save_steps (trainer_state.json of checkpoint-15)")
    for state in run_dir.glob("checkpoint-*/trainer_state.json"):
        state.unlink()
    assert run_cadence(run_dir)[0] == 5 and "spacing" in run_cadence(run_dir)[1]
    (run_dir / "checkpoint-17").mkdir()
    assert run_cadence(run_dir)[0] == 400 and "TRL's default" in run_cadence(run_dir)[1]


def test_a_schedule_whose_factors_overflow_is_a_usage_error(tmp_path: Path) -> None:
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2])
    schedule = BEMASchedule(update_freq=1, lag=0.5, multiplier=0.0, bias_power=2000)
    with pytest.raises(UsageError, match="overflows"):
        average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir, dry_run=True)


def test_a_tied_head_saved_by_the_checkpoints_but_not_by_the_base_is_left_out(tmp_path: Path) -> None:
    """FSDP and DeepSpeed save a tied lm_head.weight a second time; save_pretrained's base leaves it out. With the
    base's config saying the embeddings are tied, the head is left out of the plan (transformers ties it again)."""
    import json

    from safetensors.torch import load_file, save_file

    shapes = {"model.embed_tokens.weight": (50, 8), "lm_head.weight": (50, 8), "model.norm.weight": (8,)}
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2], shapes=shapes)
    base = load_file(base_dir / "model.safetensors")
    del base["lm_head.weight"]
    save_file(base, base_dir / "model.safetensors")
    schedule = BEMASchedule(update_freq=1)
    with pytest.raises(DataError, match="lm_head.weight"):  # untied (no config saying so): the head is missing
        average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir, dry_run=True)
    (base_dir / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    result = average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir)
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    assert any("tied to the input embedding" in note for note in result.plan.notes)
    from bema_offline.output.verify import verify

    (report,) = verify(tmp_path / "out", recompute=2, seed=0)  # its sources hold the head the output left out
    assert report.sources_checked == [0, 1, 2] and sorted(report.recomputed) == ["model.embed_tokens.weight", "model.norm.weight"]


def test_a_weight_beyond_float32_is_a_usage_error(tmp_path: Path) -> None:
    from bema_offline.methods.registry import make_method

    run_dir, base_dir, _ = make_run(tmp_path, [1, 2])
    with pytest.raises(UsageError, match="expo gives the base the weight -1e\\+39, beyond float32; choose smaller parameters"):
        average(run_dir, tmp_path / "out", schedule=make_method("expo", {"alpha": 1e39}), base_model=base_dir, dry_run=True)
