"""Pushing outputs to the Hub, up to the network boundary: a fake HfApi records every call."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
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
    folder = Path(upload["folder_path"])  # an upload folder beside the output, removed afterwards
    assert folder.parent.parent == single.parent and folder.parent.name.startswith(".single.bema-push-")
    assert not folder.parent.exists()
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


# --- what goes up: no local path, and the local folder untouched ----------------------------------------------------


class CapturingApi(FakeApi):
    """Also keeps what each upload sends: every file's bytes and inode, read while the upload folder exists."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sent: list[dict[str, tuple[bytes, int]]] = []

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_ino) for p in folder.rglob("*") if p.is_file()}
        self.sent.append(files)
        return super().upload_folder(repo_id=repo_id, folder_path=folder_path, **kwargs)


def state(folder: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """Every entry under `folder` and beside it: bytes, modification time, inode and link count of each file."""
    entries = {}
    for path in sorted(folder.parent.rglob("*")):
        status = path.lstat()
        data = path.read_bytes() if path.is_file() and path.is_relative_to(folder) else b""
        entries[str(path)] = (data, status.st_mtime_ns, status.st_ino, status.st_nlink)
    return entries


USER = "alice-bema-tester"


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> tuple[Path, Path]:
    """A run under a home folder of its own, with the base model outside the run and a config.json and a
    tokenizer_config.json that name local folders (as older transformers wrote them), averaged at every update
    step; returns (home, output)."""
    home = tmp_path_factory.mktemp("home") / USER
    work = home / "work"
    run_dir, base_dir, _ = make_run(work, [2, 4, 6])
    for checkpoint in run_dir.iterdir():
        config = json.loads((checkpoint / "config.json").read_text())
        (checkpoint / "config.json").write_text(json.dumps({**config, "_name_or_path": str(base_dir)}))
        (checkpoint / "tokenizer_config.json").write_text(json.dumps({"name_or_path": f"~/{USER}/tok", "model_max_length": 8}))
    average(run_dir, work / "avg", schedule=BEMASchedule(update_freq=2), base_model=base_dir, steps="every", save=("ema", "bema"))
    return home, work / "avg"


def test_what_goes_up_names_no_local_path_and_the_output_is_untouched(private, monkeypatch) -> None:
    home, output = private
    monkeypatch.setenv("HOME", str(home))
    before = state(output)
    api = CapturingApi()
    push_to_hub(output, "my-org/avg", api=api)
    assert state(output) == before  # not a byte, a time or a link count changed; nothing was left beside it
    assert len(api.sent) == 6
    for sent, upload in zip(api.sent, api.uploads):
        for name, (data, _) in sent.items():
            for secret in (str(home.parent), USER, str(Path.home())):
                assert secret.encode() not in data, (upload["repo_id"], name, secret)
        assert sorted(sent) == SINGLE_FILES + ["tokenizer_config.json"]
    bema_4 = next(s for s, u in zip(api.sent, api.uploads) if u["repo_id"] == "my-org/avg-bema-step-4")
    local = json.loads((output / "bema" / "step-4" / "bema_offline.json").read_text())
    record = json.loads(bema_4["bema_offline.json"][0])
    assert record["run_dir"] == "run" and record["base_model"] == "base"
    assert [entry["folder"] for entry in record["inputs"]] == ["base", "checkpoint-2", "checkpoint-4"]
    assert record["redacted"] and "redacted" not in local
    unchanged = {key: value for key, value in local.items() if key not in ("run_dir", "base_model", "inputs")}
    assert {key: record[key] for key in unchanged} == unchanged  # parameters, weights, files and their sha256
    assert [{**entry, "folder": None} for entry in record["inputs"]] == [{**entry, "folder": None} for entry in local["inputs"]]
    config = json.loads(bema_4["config.json"][0])
    assert config == {**json.loads((output / "bema" / "step-4" / "config.json").read_text()), "_name_or_path": "base"}
    assert json.loads(bema_4["tokenizer_config.json"][0]) == {"name_or_path": "tok", "model_max_length": 8}
    weights = output / "bema" / "step-4" / "model.safetensors"
    assert bema_4["model.safetensors"] == (weights.read_bytes(), weights.stat().st_ino)  # a hard link, not a copy
    assert "![effective weight of each source](effective_weights.svg)" in bema_4["README.md"][0].decode()
    assert b"bema_offline.json" in bema_4["README.md"][0] and str(output).encode() not in bema_4["README.md"][0]


def test_files_are_copied_where_they_cannot_be_linked(single: Path, monkeypatch) -> None:
    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(hub.os, "link", no_links)
    before = state(single)
    api = CapturingApi()
    push_to_hub(single, "my-org/avg", api=api)
    assert state(single) == before
    data, inode = api.sent[0]["model.safetensors"]
    assert data == (single / "model.safetensors").read_bytes() and inode != (single / "model.safetensors").stat().st_ino


def test_a_failed_upload_leaves_the_output_as_it_was(single: Path) -> None:
    before = state(single)
    with pytest.raises(HubError, match="uploading .* failed"):
        push_to_hub(single, "my-org/avg", api=FakeApi(fail={"upload_folder": "my-org/avg"}))
    assert state(single) == before


def test_no_place_for_the_upload_folder_fails_before_any_call(single: Path, monkeypatch) -> None:
    def refused(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(hub.tempfile, "mkdtemp", refused)
    api = FakeApi()
    with pytest.raises(DataError, match=f"{single.parent}: cannot make the upload folder there \\(Permission denied\\).*nothing was pushed"):
        push_to_hub(single, "my-org/avg", api=api)
    assert api.calls == []


def test_a_copy_downloaded_from_the_hub_verifies_its_files_but_names_no_sources(private, tmp_path) -> None:
    from bema_offline.output.verify import verify

    _, output = private
    api = CapturingApi()
    push_to_hub(output / "bema" / "step-6", "my-org/avg", api=api)
    download = tmp_path / "download"
    download.mkdir()
    for name, (data, _) in api.sent[0].items():
        (download / name).write_bytes(data)
    (report,) = verify(download)
    assert report.sources_checked == [] and "the copy made for the Hub" in report.notes[-1]
    with pytest.raises(DataError, match="names no source folders \\(the Hub copy\\); recompute from the local output"):
        verify(download, recompute=1)
    data = bytearray((download / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (download / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DataError, match="model.safetensors: its sha256 differs"):
        verify(download)
    (local,) = verify(output / "bema" / "step-6", recompute=2, seed=0)  # the local record still names the sources
    assert local.sources_checked == [0, 2, 4, 6] and len(local.recomputed) == 2


@pytest.mark.parametrize(
    "text, shown",
    [
        ("/home/alice/runs/dpo/checkpoint-400", "checkpoint-400"),  # inside the run: relative to it
        ("/home/alice/runs/dpo/sweep/lr=1e-5/bema", "sweep/lr=1e-5/bema"),
        ("/home/alice/runs/dpo", "dpo"),
        ("/home/alice/data/prefs.jsonl", "prefs.jsonl"),  # elsewhere: the last name
        ("~/data/prefs.jsonl", "prefs.jsonl"),
        ("C:\\Users\\alice\\data\\prefs.jsonl", "prefs.jsonl"),
        ("read /home/alice/data/prefs.jsonl (split test)", "read prefs.jsonl (split test)"),
        ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),  # a Hub id
        ("https://huggingface.co/Qwen/Qwen2.5-0.5B", "https://huggingface.co/Qwen/Qwen2.5-0.5B"),
        ("lr 1/2 and/or 3", "lr 1/2 and/or 3"),
        ("/", "/"),
    ],
)
def test_local_paths_in_any_string_are_redacted(text, shown) -> None:
    record = {"a": [text, {"b": text}], "n": 1.5, "none": None}
    assert hub.redacted_paths(record, Path("/home/alice/runs/dpo")) == {"a": [shown, {"b": shown}], "n": 1.5, "none": None}


def test_a_selected_output_goes_up_without_the_paths_of_its_leaderboard(private, tmp_path, monkeypatch) -> None:
    """best/ of a --select-by sweep carries its selection (every candidate's folder, the data file, the DPO reference)
    in its record and in eval.json, as bema-offline's eval writes them; both go up without local paths, and so does
    the card rendered from the record."""
    from bema_offline.eval.candidates import Candidate
    from bema_offline.eval.report import Result, rank
    from bema_offline.eval.select import selection_record

    home, output = private
    monkeypatch.setenv("HOME", str(home))
    candidates = [Candidate(kind, str(output / kind / "step-6"), "average") for kind in ("bema", "ema")]
    data = {"path": str(home / "data" / "heldout.jsonl"), "kind": "preference", "rows": 4, "scored_tokens": 40}
    settings = {"reference": str(home / "models" / "ref"), "beta": 0.1}
    report = rank([Result(c, {"loss": 1.0 + i}) for i, c in enumerate(candidates)], metric="loss", directions={"loss": False},
                  data=data, settings=settings)
    best = Path(shutil.copytree(output / "bema" / "step-6", tmp_path / "best"))
    record = json.loads((best / "bema_offline.json").read_text())
    record["selection"] = selection_record(Path(candidates[0].source), report)
    (best / "bema_offline.json").write_text(json.dumps(record))
    report.write(best, plot=False)  # eval.json and eval.md, as publish_best copies them in
    assert str(home).encode() in (best / "eval.json").read_bytes()
    before = state(best)
    api = CapturingApi()
    push_to_hub(best, "my-org/best", api=api)
    assert state(best) == before
    (sent,) = api.sent
    assert {"eval.json", "eval.md"} <= set(sent)
    for name, (data_bytes, _) in sent.items():
        assert str(home).encode() not in data_bytes and USER.encode() not in data_bytes, name
    uploaded = json.loads(sent["eval.json"][0])
    assert [r["source"] for r in uploaded["results"]] == ["step-6", "step-6"] and uploaded["data"]["path"] == "heldout.jsonl"
    selection = json.loads(sent["bema_offline.json"][0])["selection"]
    assert selection["source"] == "step-6" and selection["settings"]["reference"] == "ref"
    assert "DPO reference: `ref`" in sent["README.md"][0].decode()


def test_files_copied_from_the_checkpoints_that_name_local_paths_are_reported(single: Path, monkeypatch) -> None:
    (single / "tokenizer_config.json").write_text(json.dumps({"special_tokens_map_file": f"{Path.home()}/x/special_tokens_map.json"}))
    lines = []
    push_to_hub(single, "my-org/avg", api=FakeApi(), log=lines.append)
    assert lines[0] == f"note: tokenizer_config.json holds the local path {Path.home()}; it goes up as it is (to my-org/avg)"
    assert lines[1].startswith("pushed ")


# --- LoRA runs: a merged model and a PEFT adapter go up, and come back down verified ---------------------------------


def test_a_lora_adapter_output_goes_up_loads_with_peft_and_verifies_when_downloaded(tmp_path_factory, tmp_path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from tiny_lora import lora_run, quiet

    from bema_offline.output.verify import verify
    from bema_offline.sources.peft import ADAPTER_CONFIG

    run = lora_run(tmp_path_factory, "dpo")
    output = tmp_path / "adapter"
    average(run.run_dir, output, schedule=BEMASchedule(update_freq=2), lora_output="adapter")
    before = state(output)
    api = CapturingApi()
    push_to_hub(output, "my-org/avg-adapter", api=api)
    assert state(output) == before
    (sent,) = api.sent
    (upload,) = api.uploads
    assert ADAPTER_CONFIG in sent and "adapter_model.safetensors" in sent and "model.safetensors" not in sent
    delete = next(kwargs["delete_patterns"] for method, _, kwargs in api.calls if method == "upload_folder")
    assert {"config.json", "*.safetensors"} <= set(delete)  # a merged model pushed there before does not linger
    config = json.loads(sent[ADAPTER_CONFIG][0])
    local = json.loads((output / ADAPTER_CONFIG).read_text())
    assert local["base_model_name_or_path"] == str(run.base_dir)
    assert config == {**local, "base_model_name_or_path": run.base_dir.name}  # no local path, nothing else changed
    card = ModelCard(upload["card"])
    assert card.data.library_name == "peft" and "PeftModel" in upload["card"]

    download = tmp_path / "download"
    download.mkdir()
    for name, (data, _) in sent.items():
        (download / name).write_bytes(data)
    (report,) = verify(download)  # the uploaded record gives the redacted config's sha256
    assert report.adapter and "the copy made for the Hub" in report.notes[-1]
    model = quiet(PeftModel.from_pretrained, run.load_base(), download)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    stored = load_file(download / "adapter_model.safetensors")
    assert loaded and all(torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in stored.items() if "lora_" in k)
    edited = sent[ADAPTER_CONFIG][0].replace(b'"r": ', b'"r" :')  # the same size, other bytes
    assert edited != sent[ADAPTER_CONFIG][0]
    (download / ADAPTER_CONFIG).write_bytes(edited)
    with pytest.raises(DataError, match=f"{ADAPTER_CONFIG}: its sha256 differs"):
        verify(download)
