"""Which models are compared: sweep discovery, labels, baselines from provenance, and a tolerant record accessor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bema_offline.errors import DataError, UsageError
from bema_offline.eval.candidates import find_candidates
from bema_offline.eval.record import OutputRecord, read_output_record


def test_a_sweep_folder_gives_its_outputs_and_the_baselines(grid) -> None:
    found = find_candidates([grid.sweep], baselines=True)
    assert found.sweep_dir == grid.sweep
    assert [(c.label, c.role) for c in found.models] == [(name, "average") for name in grid.configs] + [
        ("base", "baseline"), ("checkpoint-12 (last)", "baseline")]
    assert Path(found.models[-2].source) == grid.base_dir.resolve()
    assert Path(found.models[-1].source) == (grid.run_dir / "checkpoint-12").resolve()


def test_nested_outputs_hidden_folders_and_duplicate_names(grid, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for config in grid.configs[:2]:
        shutil.copytree(grid.sweep / config, sweep / config / "bema")
    shutil.copytree(grid.sweep / grid.configs[0], sweep / ".staging" / "bema")
    found = find_candidates([sweep])
    assert [c.label for c in found.models] == [f"{config}/bema" for config in grid.configs[:2]]
    twice = find_candidates([sweep / grid.configs[0] / "bema", sweep / grid.configs[1] / "bema"])
    assert [c.label for c in twice.models] == [f"{config}/bema" for config in grid.configs[:2]]
    assert twice.sweep_dir is None
    assert len(find_candidates([grid.base_dir, grid.base_dir]).models) == 1  # the same folder once


def test_a_training_run_is_evaluated_but_never_chosen_as_the_report_folder(grid) -> None:
    found = find_candidates([grid.run_dir])  # its checkpoints are model folders; the run is an input
    assert [c.role for c in found.models] == ["model"] * len(found.models) and found.models
    assert found.sweep_dir is None


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "missing: no such folder; give model folders or a sweep folder"),
        ("empty", "empty: no model folder (with a config.json) in it or its subfolders"),
        ("noweights", "noweights: config.json but no weights (model.safetensors or model.safetensors.index.json)"),
    ],
)
def test_bad_folders_are_one_line(tmp_path: Path, case: str, message: str) -> None:
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "noweights":
        (folder / "config.json").write_text("{}")
    with pytest.raises(DataError) as error:
        find_candidates([folder])
    assert str(error.value).startswith(f"{tmp_path}/{message}")


def test_baselines_need_provenance(grid) -> None:
    with pytest.raises(UsageError, match="--baselines reads the base model and the last checkpoint"):
        find_candidates([grid.base_dir], baselines=True)


def test_baselines_that_moved_are_named(grid, tmp_path: Path) -> None:
    output = Path(shutil.copytree(grid.sweep / grid.configs[0], tmp_path / "out"))
    record = json.loads((output / "bema_offline.json").read_text())
    for entry in record["inputs"]:  # the base was read from a folder that is gone since
        if entry["step"] == 0:
            entry["folder"] = str(tmp_path / "gone")
    (output / "bema_offline.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"--baselines: base .*gone \(from bema_offline.json\) is no longer there"):
        find_candidates([output], baselines=True)


def test_the_record_accessor_tolerates_what_it_does_not_know(grid) -> None:
    record = read_output_record(grid.sweep / grid.configs[0])
    assert record.config == grid.configs[0] and record.method == "bema" and record.step == 12
    assert record.params["ema_power"] == 0.3 and record.params["update_freq"] == 3
    assert Path(record.theta0) == grid.base_dir.resolve() and record.last_checkpoint[0] == 12
    assert sum(record.effective_weights.values()) == pytest.approx(1.0)
    future = OutputRecord(Path("x"), {
        "method": {"name": "uniform", "last": 4, "window": None}, "kind": "average", "step": 400, "new_field": {"a": 1},
        "steps": {"theta0": 200, "found": [200, 400]}, "run_dir": "/runs/sft",
        "effective_weights": [{"step": 200, "weight": 0.5}, {"step": 400, "weight": 0.5}, {"oops": 1}],
    })
    assert future.method == "uniform" and future.params == {"last": 4}
    assert future.theta0 == "/runs/sft/checkpoint-200" and future.last_checkpoint == (400, Path("/runs/sft/checkpoint-400"))
    assert future.effective_weights == {200: 0.5, 400: 0.5}
    assert OutputRecord(Path("y"), {"method": "dema", "method_params": {"half_life": 100}}).params == {"half_life": 100}
    assert OutputRecord(Path("z"), {}).theta0 is None and OutputRecord(Path("z"), {}).method == "average"
