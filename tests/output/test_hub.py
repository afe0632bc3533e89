"""Pushing outputs to the Hub, up to the network boundary: a fake HfApi records every call."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hub_fake import FakeApi
from huggingface_hub import ModelCard
from synthetic import make_run

from bema_offline import BEMASchedule, average
from bema_offline.errors import DataError, UsageError
from bema_offline.output import hub
from bema_offline.output.hub import DELETE_PATTERNS, HubError, push_targets, push_to_hub

SINGLE_FILES = [
    "README.md",
    "bema_offline.json",
    "config.json",
    "effective_weights.svg",
    "model.safetensors",
]


@pytest.fixture(scope="module")
def averaged(tmp_path_factory) -> Path:
    """A run averaged twice: `single` (the last update step) and `multi` (every update step: step-N/)."""
    root = tmp_path_factory.mktemp("hub_run")
    run_dir, base_dir, _ = make_run(root, [2, 4, 6])
    schedule = BEMASchedule(update_freq=2)
    average(run_dir, root / "single", schedule=schedule, base_model=base_dir)
    average(run_dir, root / "multi", schedule=schedule, base_model=base_dir, steps="every")
    return root


@pytest.fixture
def single(averaged, tmp_path) -> Path:
    return Path(shutil.copytree(averaged / "single", tmp_path / "single"))


@pytest.fixture
def multi(averaged, tmp_path) -> Path:
    return Path(shutil.copytree(averaged / "multi", tmp_path / "multi"))


@pytest.fixture(autouse=True)
def token(monkeypatch) -> str:
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test_token")
    return "hf_test_token"


def test_single_output_goes_up_whole_with_a_card_naming_the_repo(single: Path) -> None:
    api = FakeApi()
    targets = push_to_hub(single, "my-org/avg", api=api)
    assert [t.where for t in targets] == ["my-org/avg"]
    assert api.methods() == ["create_repo", "upload_folder"]
    _, repo, create = api.calls[0]
    assert repo == "my-org/avg" and create == {"repo_type": "model", "private": False, "exist_ok": True}
    _, _, upload = api.calls[1]
    assert upload["folder_path"] == str(single)
    assert upload["revision"] is None
    assert upload["commit_message"] == "bema-offline: BEMA of run at step 6"
    assert upload["delete_patterns"] == DELETE_PATTERNS
    assert api.uploads[0]["files"] == SINGLE_FILES
    card = api.uploads[0]["card"]
    assert 'from_pretrained("my-org/avg")' in card and "path/to/this/folder" not in card
    assert ModelCard.load(single / "README.md").data.to_dict()["tags"][:2] == ["bema", "bema-offline"]


def test_private_revision_and_commit_message(single: Path) -> None:
    api = FakeApi()
    push_to_hub(single, "my-org/avg", private=True, revision="round-2", commit_message="round 2 BEMA", api=api)
    assert api.methods() == ["create_repo", "repo_info", "create_branch", "upload_folder"]
    assert api.calls[0][2]["private"] is True
    assert api.calls[2][2] == {"branch": "round-2", "repo_type": "model", "exist_ok": True}
    upload = api.calls[3][2]
    assert upload["revision"] == "round-2" and upload["commit_message"] == "round 2 BEMA"
    assert 'from_pretrained("my-org/avg", revision="round-2")' in api.uploads[0]["card"]


def test_revision_main_is_the_main_branch(single: Path) -> None:
    api = FakeApi()
    push_to_hub(single, "my-org/avg", revision="main", api=api)
    assert api.methods() == ["create_repo", "upload_folder"]


def test_private_refuses_an_existing_public_repo_before_uploading(single: Path) -> None:
    api = FakeApi(public=("my-org/avg",))
    with pytest.raises(HubError, match="my-org/avg already exists and is public"):
        push_to_hub(single, "my-org/avg", private=True, api=api)
    assert "upload_folder" not in api.methods()


def test_missing_token_fails_before_any_call(single: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub, "get_token", lambda: None)
    made = []
    monkeypatch.setattr(hub, "make_api", lambda token: made.append(token))
    api = FakeApi()
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push_to_hub(single, "my-org/avg", api=api)
    with pytest.raises(HubError, match="no Hugging Face token"):
        push_to_hub(single, "my-org/avg")
    assert api.calls == [] and made == []


def test_token_comes_from_hf_token(single: Path, monkeypatch) -> None:
    from huggingface_hub import get_token

    monkeypatch.setattr(hub, "get_token", get_token)  # the real lookup
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    api = FakeApi()
    made = []
    monkeypatch.setattr(hub, "make_api", lambda token: made.append(token) or api)
    push_to_hub(single, "my-org/avg")
    assert made == ["hf_from_env"]
    assert api.methods() == ["create_repo", "upload_folder"]


def test_a_repo_that_cannot_be_created_fails_before_any_upload(multi: Path) -> None:
    api = FakeApi(fail={"create_repo": "my-org/avg-step-6"})
    with pytest.raises(HubError) as error:
        push_to_hub(multi, "my-org/avg", api=api)
    message = str(error.value)
    assert "cannot create or access the repo my-org/avg-step-6" in message
    assert "403 Forbidden" in message and "request id" not in message  # one line
    assert "(the token may not write there: use a write token, and check the organisation name)" in message
    assert "nothing was uploaded" in message
    assert api.methods() == ["create_repo"] * 3
    assert api.uploads == []


def test_multi_output_repos_layout(multi: Path) -> None:
    api = FakeApi()
    targets = push_to_hub(multi, "my-org/avg", api=api)
    assert [t.where for t in targets] == ["my-org/avg-step-2", "my-org/avg-step-4", "my-org/avg-step-6"]
    assert api.methods() == ["create_repo"] * 3 + ["upload_folder"] * 3  # every repo exists before any upload
    assert [u["repo_id"] for u in api.uploads] == ["my-org/avg-step-2", "my-org/avg-step-4", "my-org/avg-step-6"]
    assert all(u["files"] == SINGLE_FILES for u in api.uploads)
    assert [Path(c[2]["folder_path"]).name for c in api.calls[3:]] == ["step-2", "step-4", "step-6"]
    assert 'from_pretrained("my-org/avg-step-4")' in api.uploads[1]["card"]


def test_multi_output_branches_layout(multi: Path) -> None:
    api = FakeApi()
    targets = push_to_hub(multi, "my-org/avg", layout="branches", api=api)
    assert [t.where for t in targets] == ["my-org/avg@step-2", "my-org/avg@step-4", "my-org/avg@step-6"]
    assert api.methods() == ["create_repo"] + ["create_branch"] * 3 + ["upload_folder"] * 3 + ["upload_file"]
    assert [c[2]["branch"] for c in api.calls[1:4]] == ["step-2", "step-4", "step-6"]
    assert [u["revision"] for u in api.uploads] == ["step-2", "step-4", "step-6"]
    assert 'from_pretrained("my-org/avg", revision="step-4")' in api.uploads[1]["card"]
    index = api.calls[-1][2]
    assert index["path_in_repo"] == "README.md" and "revision" not in index  # on main
    text = index["content"].decode()
    assert "| `step-4` | bema | 4 |" in text


def test_branches_layout_refuses_a_single_revision_for_several_outputs(multi: Path) -> None:
    api = FakeApi()
    with pytest.raises(UsageError, match="each of the 3 outputs gets its own branch"):
        push_to_hub(multi, "my-org/avg", layout="branches", revision="x", api=api)
    assert api.calls == []


def test_a_failed_index_card_says_the_outputs_are_up(multi: Path) -> None:
    api = FakeApi(fail={"upload_file": "my-org/avg"})
    with pytest.raises(HubError, match="index card on the main branch of my-org/avg failed: 403 Forbidden.*; every output was pushed"):
        push_to_hub(multi, "my-org/avg", layout="branches", api=api)
    assert len(api.uploads) == 3


def test_a_failed_upload_says_what_was_pushed(multi: Path) -> None:
    api = FakeApi(fail={"upload_folder": "my-org/avg-step-4"})
    with pytest.raises(HubError, match="pushed so far: my-org/avg-step-2; run `bema-offline push` again"):
        push_to_hub(multi, "my-org/avg", api=api)


def test_not_an_output_folder(tmp_path: Path, single: Path) -> None:
    api = FakeApi()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a bema-offline output"):
        push_to_hub(tmp_path / "empty", "my-org/avg", api=api)
    (single / "model.safetensors").unlink()
    with pytest.raises(DataError, match="has bema_offline.json but no model.safetensors"):
        push_to_hub(single, "my-org/avg", api=api)
    with pytest.raises(DataError, match="no such folder"):
        push_to_hub(tmp_path / "missing", "my-org/avg", api=api)
    assert api.calls == []


@pytest.mark.parametrize("repo_id", ["avg", "my-org/", "my org/avg", "a/b/c", "my-org/av--g"])
def test_bad_repo_ids(repo_id: str) -> None:
    with pytest.raises(UsageError):
        push_targets([""], repo_id)


def test_derived_names() -> None:
    relpaths = ["bema/step-800", "ema/step-800", "lr 1e-5/step-800"]
    assert push_targets(relpaths, "o/n") == [("o/n-bema-step-800", None), ("o/n-ema-step-800", None), ("o/n-lr-1e-5-step-800", None)]
    assert push_targets(relpaths, "o/n", layout="branches")[2] == ("o/n", "lr-1e-5-step-800")
    with pytest.raises(UsageError, match="choose a shorter NAME or use --push-layout branches"):
        push_targets(["step-800", "step-1600"], "o/" + "n" * 88)
    with pytest.raises(UsageError, match="not a valid branch name"):
        push_targets([""], "o/n", revision="bad..name")


def test_every_recorded_call_fits_the_real_hfapi_signature(multi: Path, single: Path) -> None:
    """The fake accepts anything; the real HfApi must accept exactly what was sent."""
    import inspect

    from huggingface_hub import HfApi

    api = FakeApi()
    push_to_hub(multi, "my-org/avg", layout="branches", private=True, api=api)
    push_to_hub(single, "my-org/one", revision="dev", commit_message="m", api=api)
    assert {method for method, _, _ in api.calls} == {"create_repo", "repo_info", "create_branch", "upload_folder", "upload_file"}
    for method, repo_id, kwargs in api.calls:
        kwargs = dict(kwargs)
        if method == "upload_file":
            kwargs["path_or_fileobj"] = kwargs.pop("content")
        if method in ("upload_folder", "upload_file"):
            inspect.signature(getattr(HfApi, method)).bind(None, repo_id=repo_id, **kwargs)
        else:
            inspect.signature(getattr(HfApi, method)).bind(None, repo_id, **kwargs)
