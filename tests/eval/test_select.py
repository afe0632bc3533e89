"""select_best: the right folder is published as SWEEP/best, atomically; any failure leaves the sweep intact and no best."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bema_offline import faults
from bema_offline.errors import DataError, UsageError
from bema_offline.eval import evaluate, runner, select_best
from bema_offline.eval.candidates import find_candidates
from bema_offline.output.card import write_card
from bema_offline.output.verify import verify


@pytest.fixture
def sweep(grid, tmp_path: Path) -> Path:
    """A private copy of the grid's sweep, free to change."""
    return Path(shutil.copytree(grid.sweep, tmp_path / "sweep"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (hidden ones too) with the sha256 of its bytes."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def test_the_winner_is_published_as_a_real_folder_with_the_leaderboard(grid, sweep: Path, tmp_path: Path) -> None:
    expected = evaluate([grid.sweep], grid.heldout)  # the ranking computed apart
    selection = select_best(sweep, grid.heldout)
    best = sweep / "best"
    assert selection.winner == sweep / expected.winner.label and selection.best == best
    assert best.is_dir() and not best.is_symlink()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (best / name).read_bytes() == (selection.winner / name).read_bytes()
    record = json.loads((best / "bema_offline.json").read_text())
    assert record["config"] == expected.winner.label and record["selection"]["winner"] == expected.winner.label
    assert record["selection"]["metric"] == "loss"
    assert record["selection"]["value"] == pytest.approx(expected.winner.metrics["loss"], rel=1e-12)
    assert [row["label"] for row in record["selection"]["results"]] == [r.label for r in expected.ranked]
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    assert (best / "README.md").read_text() == write_card(rendered, record).read_text()  # from the record alone, as push renders it
    assert "## Leaderboard" not in write_card(rendered, {**record, "selection": None}).read_text()
    card = (best / "README.md").read_text()
    assert card.startswith("---\nbase_model") or card.startswith("---\nlibrary_name")  # the front matter stays first
    assert f"**Selected** by `bema-offline eval`: `{expected.winner.label}` is the best of 4 outputs" in card
    assert "## Leaderboard" in card and f"| 1 | **`{expected.winner.label}`** |" in card
    assert sorted(p.name for p in selection.report_files) == ["eval.json", "eval.md", "eval.png"]
    assert all((best / p.name).read_bytes() == p.read_bytes() for p in selection.report_files)
    assert not [p.name for p in sweep.iterdir() if p.name.startswith(".")]  # no staging folder, no lock left
    verify(best, recompute=2)  # a faithful copy: tensors recomputed from the run's checkpoints, bit for bit
    assert [c.label for c in find_candidates([sweep]).models] == grid.configs  # best/ is not a candidate next time


def test_a_later_selection_replaces_the_previous_one(grid, sweep: Path) -> None:
    first = select_best(sweep, grid.heldout)
    second = select_best(sweep, grid.heldout, metric="perplexity")
    assert second.winner == first.winner  # the same order by perplexity, exp(loss)
    record = json.loads((sweep / "best" / "bema_offline.json").read_text())
    assert record["selection"]["metric"] == "perplexity"


def test_a_failure_during_evaluation_leaves_the_sweep_intact_and_no_best(grid, sweep: Path, monkeypatch) -> None:
    before = snapshot(sweep)
    score = runner._score
    calls = []

    def failing(source, *args, **kwargs):
        calls.append(source)
        if len(calls) == 3:
            raise RuntimeError("injected failure while evaluating")
        return score(source, *args, **kwargs)

    monkeypatch.setattr(runner, "_score", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        select_best(sweep, grid.heldout)
    assert len(calls) == 3 and snapshot(sweep) == before


def test_a_broken_output_fails_with_its_name_and_publishes_nothing(grid, sweep: Path) -> None:
    broken = sweep / grid.configs[1] / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    before = snapshot(sweep)
    with pytest.raises(DataError, match=f"{grid.configs[1]}: transformers cannot load it as a causal LM"):
        select_best(sweep, grid.heldout)
    assert snapshot(sweep) == before


def test_a_failure_while_publishing_keeps_the_previous_best(grid, sweep: Path) -> None:
    select_best(sweep, grid.heldout)
    before = snapshot(sweep)
    faults.arm("publish", 1, "eio")
    try:
        with pytest.raises(OSError):
            select_best(sweep, grid.heldout, metric="perplexity")
    finally:
        faults.disarm()
    after = snapshot(sweep)
    assert {k: v for k, v in after.items() if not k.startswith("eval.")} == {k: v for k, v in before.items() if not k.startswith("eval.")}
    assert json.loads((sweep / "best" / "bema_offline.json").read_text())["selection"]["metric"] == "loss"


def test_a_best_folder_that_no_selection_wrote_is_refused(grid, sweep: Path) -> None:
    (sweep / "best").mkdir()
    (sweep / "best" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="best exists and was not written by a selection; move it away"):
        select_best(sweep, grid.heldout)
    assert (sweep / "best" / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="not a sweep folder"):
        select_best(sweep / grid.configs[0], grid.heldout)


def test_a_nan_output_is_reported_and_never_selected_and_a_tie_is_reported(grid, sweep: Path) -> None:
    nan_folder = sweep / grid.configs[0]
    tensors = load_file(nan_folder / "model.safetensors")
    tensors["model.norm.weight"][0] = math.nan
    save_file(tensors, nan_folder / "model.safetensors", metadata={"format": "pt"})
    ranking = evaluate([grid.sweep], grid.heldout)
    runner_up = next(r.label for r in ranking.ranked if r.label != grid.configs[0])
    shutil.copytree(sweep / runner_up, sweep / "zz-copy")  # the same weights under another name: an exact tie
    selection = select_best(sweep, grid.heldout)
    report = selection.report
    assert report.ranked[-1].label == grid.configs[0] and report.ranked[-1].rank is None
    assert f"loss is NaN for {grid.configs[0]}" in report.notes[0]
    assert selection.winner == sweep / runner_up
    assert report.ties == [f"{runner_up}, zz-copy share loss = {report.ranked[0].metrics['loss']:.6f}; exact tie for "
                           f"the win: {runner_up} was taken as the first listed"]
    markdown = (sweep / "eval.md").read_text()
    assert "- Tie: " in markdown and "- Note: loss is NaN" in markdown and "| - | `" in markdown


def test_a_winner_without_provenance_is_not_published(grid, tmp_path: Path) -> None:
    sweep = tmp_path / "folders"
    shutil.copytree(grid.sweep / grid.configs[0], sweep / "plain")
    (sweep / "plain" / "bema_offline.json").unlink()
    with pytest.raises(DataError, match="plain: the winner has no bema_offline.json; best/ is published for outputs of bema-average only"):
        select_best(sweep, grid.heldout)
    assert not (sweep / "best").exists() and (sweep / "eval.json").is_file()


def test_select_by_on_the_command_line_publishes_the_winner_and_pushes_only_it(grid, tmp_path: Path, monkeypatch, capsys) -> None:
    """`bema-average --grid ... --select-by DATA --push-to-hub`: the sweep is written, evaluated, its winner
    published as OUTPUT/best, and only that folder goes to the Hub (a fake HfApi)."""
    from hub_fake import FakeApi
    from cli.run_entry import run_cli

    from bema_offline.cli import average_command
    from bema_offline.output import hub

    api = FakeApi()
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub, "make_api", lambda token: api)
    out = tmp_path / "sweep"
    args = [grid.run_dir, "--base-model", grid.base_dir, "--update-freq", "3", "--grid", "ema_power=0.3,0.7", "bias_power=0.1,0.4",
            "-o", out, "--select-by", grid.heldout, "--push-to-hub", "me/best-avg"]
    code, stdout, stderr = run_cli(average_command, args, capsys)
    assert code == 0, stderr
    expected = evaluate([out], grid.heldout)
    assert f"published {out / expected.winner.label} as {out / 'best'}" in stdout
    assert json.loads((out / "best" / "bema_offline.json").read_text())["selection"]["winner"] == expected.winner.label
    assert [u["repo_id"] for u in api.uploads] == ["me/best-avg"]  # one repo: the winner, not the sweep


def test_select_by_refuses_what_it_cannot_do(grid, tmp_path: Path, capsys) -> None:
    from cli.run_entry import run_cli

    from bema_offline.cli import average_command

    common = [grid.run_dir, "--base-model", grid.base_dir, "--update-freq", "3", "-o", tmp_path / "out"]
    code, _, stderr = run_cli(average_command, [*common, "--select-by", grid.heldout, "--dry-run"], capsys)
    assert code == 2 and "cannot run with --dry-run" in stderr
    code, _, stderr = run_cli(average_command, [*common, "--select-by", grid.heldout], capsys)
    assert code == 2 and "this run would write one (use --grid or --sweep)" in stderr
    no_columns = tmp_path / "no-columns.jsonl"
    no_columns.write_text('{"question": "?"}\n')
    sweep = [*common, "--grid", "ema_power=0.3,0.7"]
    for options, code_wanted, message in (
        (["--select-by", tmp_path / "missing.jsonl"], 1, "missing.jsonl"),
        (["--select-by", no_columns], 1, "no-columns.jsonl"),
        (["--select-by", grid.heldout, "--select-metric", "reward_accuracy"], 2, "--select-metric reward_accuracy: not a metric of this data"),
        (["--select-by", grid.heldout, "--lora-output", "adapter"], 2, "not PEFT adapters"),
    ):
        code, _, stderr = run_cli(average_command, [*sweep, *options], capsys)
        assert code == code_wanted and stderr.count("\n") == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()  # every check ran before any averaging
