"""`bema-offline push` and `bema-average --push-to-hub`, run like the entry points, with a fake HfApi."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hub_fake import FakeApi
from run_entry import run_cli
from synthetic import make_run

from bema_offline import BEMASchedule, average
from bema_offline.cli import average_command, cli
from bema_offline.output import hub


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("push_run")
    run_dir, base_dir, _ = make_run(root, [2, 4, 6])
    average(run_dir, root / "avg", schedule=BEMASchedule(update_freq=2), base_model=base_dir)
    return run_dir, base_dir, root / "avg"


@pytest.fixture
def api(monkeypatch) -> FakeApi:
    api = FakeApi()
    api.tokens = []
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub, "make_api", lambda token: api.tokens.append(token) or api)
    return api


def files_and_times(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes() if p.is_file() else b"", p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_push_command(run, api, tmp_path, capsys) -> None:
    folder = shutil.copytree(run[2], tmp_path / "avg")
    before = files_and_times(tmp_path)
    code, out, err = run_cli(cli, ["push", folder, "my-org/avg", "--private", "--commit-message", "hello"], capsys)
    assert code == 0, err
    assert files_and_times(tmp_path) == before  # the output is only read; the upload folder beside it is gone
    assert str(tmp_path) not in api.uploads[0]["card"]
    assert api.tokens == ["hf_test"]
    assert api.methods() == ["create_repo", "repo_info", "upload_folder"]
    assert api.calls[2][2]["commit_message"] == "hello"
    assert f"pushed {folder} to my-org/avg (https://huggingface.co/my-org/avg/commit/abc)" in out


def test_push_dry_run_needs_no_token_and_calls_nothing(run, api, monkeypatch, capsys) -> None:
    monkeypatch.setattr(hub, "get_token", lambda: None)
    code, out, err = run_cli(cli, ["push", run[2], "my-org/avg", "--dry-run"], capsys)
    assert code == 0, err
    assert f"would push {run[2]} to my-org/avg: README.md, bema_offline.json" in out
    assert api.calls == []


def test_push_errors_are_one_line(run, api, monkeypatch, tmp_path, capsys) -> None:
    code, _, err = run_cli(cli, ["push", tmp_path, "my-org/avg"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path}: not a bema-offline output")
    code, _, err = run_cli(cli, ["push", run[2], "not-a-repo-id"], capsys)
    assert code == 2 and "write it as ORG/NAME" in err
    monkeypatch.setattr(hub, "get_token", lambda: None)
    code, _, err = run_cli(cli, ["push", run[2], "my-org/avg"], capsys)
    assert code == 1 and err == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access); nothing was pushed\n"
    assert api.calls == []


def test_average_then_push(run, api, tmp_path, capsys) -> None:
    run_dir, base_dir, _ = run
    out_dir = tmp_path / "out"
    args = [run_dir, "--base-model", base_dir, "--update-freq", 2, "-o", out_dir, "--every-update", "-q"]
    code, out, err = run_cli(average_command, [*args, "--push-to-hub", "my-org/avg", "--push-layout", "branches"], capsys)
    assert code == 0, err
    assert api.methods() == ["create_repo"] + ["create_branch"] * 3 + ["upload_folder"] * 3 + ["upload_file"]
    assert [u["revision"] for u in api.uploads] == ["step-2", "step-4", "step-6"]
    assert api.uploads[0]["files"] == ["README.md", "bema_offline.json", "config.json", "effective_weights.svg", "model.safetensors"]
    assert out == ""  # --quiet


def test_a_failed_average_pushes_nothing(run, api, tmp_path, capsys) -> None:
    run_dir, base_dir, _ = run
    out_dir = tmp_path / "out"
    # update_freq 3 needs checkpoint-3 and -6: step 3 is missing, so the average fails
    args = [run_dir, "--base-model", base_dir, "--update-freq", 3, "-o", out_dir, "--push-to-hub", "my-org/avg"]
    code, _, err = run_cli(average_command, args, capsys)
    assert code == 1 and "have no checkpoint" in err
    assert api.calls == [] and api.tokens == []
    assert not out_dir.exists()


def test_missing_token_stops_before_averaging(run, api, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(hub, "get_token", lambda: None)
    run_dir, base_dir, _ = run
    out_dir = tmp_path / "out"
    args = [run_dir, "--base-model", base_dir, "--update-freq", 2, "-o", out_dir, "--push-to-hub", "my-org/avg"]
    code, _, err = run_cli(average_command, args, capsys)
    assert code == 1 and err.startswith("error: no Hugging Face token")
    assert not out_dir.exists() and api.calls == []


def test_a_failed_push_after_averaging_says_how_to_retry(run, monkeypatch, tmp_path, capsys) -> None:
    api = FakeApi(fail={"create_repo": "my-org/avg"})
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub, "make_api", lambda token: api)
    run_dir, base_dir, _ = run
    out_dir = tmp_path / "out"
    args = [run_dir, "--base-model", base_dir, "--update-freq", 2, "-o", out_dir, "-q", "--push-to-hub", "my-org/avg"]
    code, out, err = run_cli(average_command, args, capsys)
    assert code == 1 and err.count("\n") == 1
    assert "cannot create or access the repo my-org/avg" in err
    assert f"push it with `bema-offline push {out_dir} my-org/avg`" in err
    assert (out_dir / "model.safetensors").is_file()
    assert "upload_folder" not in api.methods()


def test_average_dry_run_shows_the_push(run, api, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(hub, "get_token", lambda: None)  # a dry run needs no token
    run_dir, base_dir, _ = run
    out_dir = tmp_path / "out"
    args = [run_dir, "--base-model", base_dir, "--update-freq", 2, "-o", out_dir, "--every-update", "--dry-run", "--push-to-hub", "my-org/avg"]
    code, out, err = run_cli(average_command, args, capsys)
    assert code == 0, err
    assert f"would push {out_dir / 'step-4'} to my-org/avg-step-4" in out
    assert api.calls == [] and not out_dir.exists()


def test_hub_settings_need_push_to_hub(run, api, tmp_path, capsys) -> None:
    code, _, err = run_cli(average_command, [run[0], "--private", "-o", tmp_path / "out"], capsys)
    assert code == 2 and "--private needs --push-to-hub ORG/NAME" in err
    code, _, err = run_cli(average_command, [run[0], "--push-layout", "branches", "-o", tmp_path / "out"], capsys)
    assert code == 2 and "--push-layout needs --push-to-hub ORG/NAME" in err and not (tmp_path / "out").exists()
