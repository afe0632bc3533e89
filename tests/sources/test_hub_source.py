"""Runs on the Hub: listing (a fake HfApi), huggingface_hub's own cache read offline, downloads ahead and their
deletion, headers over range requests, and the one-line errors. Nothing touches the network."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest
from huggingface_hub import constants
from hub_repo import FakeDownload, FakeHubApi, FakeRepo, cache_files, folder_files
from synthetic import make_run

from bema_offline import BEMASchedule, average
from bema_offline.errors import DataError, UsageError
from bema_offline.sources.hub import (
    HubDownloads,
    check_arrival,
    open_hub_run,
    parse_hub_url,
    revision_step,
    small_files,
    weight_files,
)
from bema_offline.sources.run import load_source

REPO = "my-org/dpo-run"
STEPS = [2, 4, 6, 8]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A synthetic run on disk, two checkpoints sharded, with the files a Trainer also pushes."""
    root = tmp_path_factory.mktemp("run")
    run_dir, base_dir, _ = make_run(root, STEPS)
    for step in STEPS:
        (run_dir / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"not weights" * 100)
        (run_dir / f"checkpoint-{step}" / "training_args.bin").write_bytes(b"args")
    return run_dir, base_dir


@pytest.fixture
def pushed(local_run):
    """The run pushed with hub_strategy='all_checkpoints': checkpoint folders at the root of main."""
    run_dir, _ = local_run
    repo = FakeRepo(REPO)
    repo.commit({**folder_files(run_dir), "README.md": b"# run\n"})
    return repo


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_urls_parse_and_bad_ones_get_one_line():
    assert parse_hub_url("hf://my-org/dpo-run") == ("my-org/dpo-run", None)
    assert parse_hub_url("hf://my-org/dpo-run@v2/") == ("my-org/dpo-run", "v2")
    for bad in ("hf://dpo-run", "hf://a/b/c", "hf://my-org/dpo-run@", "hf://my--org/x", "my-org/dpo-run"):
        with pytest.raises(UsageError, match="hf://ORG/NAME"):
            parse_hub_url(bad)


@pytest.mark.parametrize(
    ("name", "step"),
    [("step1000", 1000), ("step1000-tokens4B", 1000), ("stage1-step2000-tokens8B", 2000), ("checkpoint-500", 500),
     ("ckpt_30", 30), ("global_step7", 7), ("main", None), ("v1-v2", None), ("step1-step2", None)],
)
def test_the_step_of_a_revision_is_its_step_number_or_its_only_number(name, step):
    assert revision_step(name) == step


@pytest.mark.parametrize(
    ("files", "weights"),
    [
        ({"adapter_config.json", "adapter_model.safetensors"}, ["adapter_model.safetensors"]),
        ({"adapter_config.json", "adapter_model.bin", "training_args.bin"}, ["adapter_model.bin"]),  # saved without safetensors
        ({"adapter_config.json", "adapter_model.safetensors", "model.safetensors"}, ["adapter_model.safetensors"]),  # as locally
        ({"pytorch_model.bin", "training_args.bin", "optimizer.pt"}, ["pytorch_model.bin"]),
    ],
)
def test_a_hub_checkpoint_s_weights_are_those_the_local_reader_reads(files, weights):
    repo = FakeRepo(REPO)
    repo.commit({f"checkpoint-2/{name}": b"x" for name in files})
    run = open_hub_run(f"hf://{REPO}", api=FakeHubApi(repo))
    assert weight_files(run, 2) == weights


def test_a_pushed_run_lists_its_checkpoints_and_downloads_only_weights_and_small_files(pushed):
    run = open_hub_run(f"hf://{REPO}", api=FakeHubApi(pushed))
    assert sorted(run.checkpoints) == STEPS
    assert weight_files(run, 4) == ["model.safetensors"]
    assert small_files(run, 4) == ["config.json", "trainer_state.json"]


def test_a_pushed_run_averages_offline_from_the_cache_to_the_bits_of_the_local_run(tmp_path, local_run, pushed, offline):
    """huggingface_hub's own hf_hub_download reads the prepared cache (HF_HUB_OFFLINE=1); the run folder of links it
    fills averages exactly as the run on disk."""
    run_dir, base_dir = local_run
    cache = tmp_path / "cache"
    cache_files(cache, pushed)
    schedule = BEMASchedule(update_freq=4)  # reads the base model, checkpoint-4 and checkpoint-8
    run = open_hub_run(f"hf://{REPO}", api=FakeHubApi(pushed))
    with HubDownloads(run, tmp_path, cache_dir=cache) as hub:
        hub.order = [4, 8]
        hub.prepare()
        for step in hub.order:
            hub.fetch(step)
        ours = average(hub.folder, tmp_path / "hub-out", schedule=schedule, base_model=base_dir)
        assert ours.plan.found_steps == STEPS
        assert os.listdir(hub.folder / "checkpoint-6") == []  # never needed, never fetched
        assert not (hub.folder / "checkpoint-4" / "optimizer.pt").exists()
    assert not hub.folder.exists()
    average(run_dir, tmp_path / "local-out", schedule=schedule, base_model=base_dir)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "hub-out" / name).read_bytes() == (tmp_path / "local-out" / name).read_bytes()
    assert len(list((cache / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir())) > 0  # the cache is kept


def test_offline_with_a_file_missing_from_the_cache_names_it_and_how_to_fetch_it(tmp_path, pushed, offline):
    cache = tmp_path / "cache"
    cache_files(cache, pushed, only=lambda path: not path.endswith("checkpoint-6/model.safetensors"))
    run = open_hub_run(f"hf://{REPO}", api=FakeHubApi(pushed))
    with HubDownloads(run, tmp_path, cache_dir=cache) as hub:
        hub.fetch(4)
        with pytest.raises(DataError, match=r"checkpoint-6/model.safetensors .* HF_HUB_OFFLINE=1 .*`hf download my-org/dpo-run checkpoint-6/model.safetensors"):
            hub.fetch(6)


def test_offline_without_an_api_lists_the_run_from_the_cache(tmp_path, pushed, offline):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"offline \(HF_HUB_OFFLINE=1\) and not in the cache .*`hf download my-org/dpo-run`"):
        open_hub_run(f"hf://{REPO}", cache_dir=cache)
    cache_files(cache, pushed, only=lambda path: "checkpoint-2/" not in path)
    run = open_hub_run(f"hf://{REPO}", cache_dir=cache)
    assert sorted(run.checkpoints) == [4, 6, 8] and run.offline
    assert "only cached steps" in run.notes[-1]
    assert weight_files(run, 8) == ["model.safetensors"]


def test_listing_errors_are_one_line(tmp_path, pushed, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(DataError, match="no such repo, or a private one and no Hugging Face token is set; .* HF_TOKEN"):
        open_hub_run(f"hf://{REPO}", api=FakeHubApi(pushed, private=(REPO,)))
    with pytest.raises(DataError, match="hf://my-org/dpo-run@nope: no such revision"):
        open_hub_run(f"hf://{REPO}@nope", api=FakeHubApi(pushed))
    single = FakeRepo("my-org/model")
    single.commit({"model.safetensors": b"x", "config.json": b"{}"})
    with pytest.raises(DataError, match=r"no checkpoint-N/ folders in the repo; .*--revisions 'step\*'"):
        open_hub_run("hf://my-org/model", api=FakeHubApi(single))
    with pytest.raises(UsageError, match="either @v1 or --revisions"):
        open_hub_run("hf://my-org/model@v1", revisions="step*", api=FakeHubApi(single))


@pytest.fixture
def revisions_repo(local_run):
    """The same run published as one branch per step (as Pythia and OLMo publish theirs), plus main."""
    run_dir, _ = local_run
    repo = FakeRepo("EleutherAI/tiny")
    for step in STEPS:
        repo.commit(folder_files(run_dir / f"checkpoint-{step}"), branch=f"step{step}-tokens{step * 2}M")
    repo.commit(folder_files(run_dir / "checkpoint-8"), branch="main")
    return repo


def test_revisions_are_chosen_by_name_or_pattern_and_average_like_the_local_run(tmp_path, local_run, revisions_repo, offline):
    run_dir, base_dir = local_run
    api = FakeHubApi(revisions_repo)
    run = open_hub_run("hf://EleutherAI/tiny", revisions="step*", api=api)
    assert sorted(run.checkpoints) == STEPS
    assert run.checkpoints[4].label == "revision step4-tokens8M" and run.checkpoints[4].files is None  # listed when needed
    named = open_hub_run("hf://EleutherAI/tiny", revisions="step2-tokens4M, step8-tokens16M", api=api)
    assert sorted(named.checkpoints) == [2, 8]
    cache = tmp_path / "cache"
    cache_files(cache, revisions_repo)
    schedule = BEMASchedule(update_freq=2, update_after=2)
    with HubDownloads(run, tmp_path, cache_dir=cache) as hub:
        hub.order = STEPS
        for step in STEPS:
            hub.fetch(step)
        average(hub.folder, tmp_path / "hub-out", schedule=schedule)
    average(run_dir, tmp_path / "local-out", schedule=schedule)
    assert (tmp_path / "hub-out" / "model.safetensors").read_bytes() == (tmp_path / "local-out" / "model.safetensors").read_bytes()


def test_revision_choices_that_cannot_work_get_one_line(revisions_repo):
    api = FakeHubApi(revisions_repo)
    with pytest.raises(DataError, match=r"--revisions 'stp\*' matches no branch or tag of EleutherAI/tiny \(it has 5: main, step2"):
        open_hub_run("hf://EleutherAI/tiny", revisions="stp*", api=api)
    with pytest.raises(DataError, match="'step3' is not a branch or tag"):
        open_hub_run("hf://EleutherAI/tiny", revisions="step3", api=api)
    with pytest.raises(DataError, match="cannot tell the step of revision 'main'"):
        open_hub_run("hf://EleutherAI/tiny", revisions="*", api=api)
    revisions_repo.commit({"model.safetensors": b""}, branch="step4-retry")
    with pytest.raises(DataError, match="'step4-retry' and 'step4-tokens8M' are both step 4; name only one"):
        open_hub_run("hf://EleutherAI/tiny", revisions="step4*", api=api)


def test_downloads_run_one_step_ahead_and_release_deletes_only_what_this_run_downloaded(tmp_path, pushed):
    cache = tmp_path / "cache"
    cache_files(cache, pushed, only=lambda path: path.startswith("checkpoint-8/"))  # already cached: never deleted
    download = FakeDownload(pushed)
    gate = threading.Event()
    calls = []

    def gated(repo_id, filename, **kwargs):
        calls.append(filename)
        if filename == "checkpoint-6/model.safetensors":
            gate.wait(10)
        return download(repo_id, filename, **kwargs)

    lines = []
    run = open_hub_run(f"hf://{REPO}", api=FakeHubApi(pushed))
    hub = HubDownloads(run, tmp_path, keep=False, cache_dir=cache, download=gated, log=lines.append)
    try:
        hub.order = [2, 4, 6, 8]
        source = hub.fetch(2)
        assert source.step == 2 and "checkpoint-6/model.safetensors" not in calls
        blob2 = os.path.realpath(hub.folder / "checkpoint-2" / "model.safetensors")
        hub.fetch(4)  # asks for checkpoint-6 ahead, which waits at the gate
        assert not any(call.startswith("checkpoint-8/") for call in calls)
        hub.release(2)
        assert not os.path.exists(blob2) and not (hub.folder / "checkpoint-2" / "model.safetensors").exists()
        assert (hub.folder / "checkpoint-2" / "config.json").is_file()  # small files stay
        gate.set()
        hub.release(4)
        hub.fetch(6)
        hub.release(6)
        blob8 = os.path.realpath(hub.folder / "checkpoint-8" / "model.safetensors")
        hub.fetch(8)
        hub.release(8)
        assert os.path.exists(blob8)  # it was in the cache before the run
        assert hub.peak_bytes <= 2 * os.path.getsize(blob8)
        assert [line.split(" of ")[0] for line in lines] == ["downloaded checkpoint-2", "downloaded checkpoint-4", "downloaded checkpoint-6"]
    finally:
        hub.close()


def test_blobs_of_an_earlier_commit_in_the_cache_survive_a_run_that_reuses_them(tmp_path, local_run):
    """A run pushed with hub_strategy='all_checkpoints' gets a commit per save; the cache may hold an earlier commit's
    snapshot, whose blobs a download of the new commit reuses (it adds only the snapshot link): the run deletes that
    link and never the blob, so the earlier snapshot stays readable."""
    run_dir, _ = local_run
    repo = FakeRepo(REPO)
    early = {k: v for k, v in folder_files(run_dir).items() if not k.startswith("checkpoint-8/")}
    repo.commit(early, branch="early")
    cache = tmp_path / "cache"
    cache_files(cache, repo, branches=("early",))
    repo.commit({**folder_files(run_dir), "README.md": b"# run\n"})
    old = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / repo.branches["early"] / "checkpoint-2" / "model.safetensors"
    before = old.read_bytes()
    run = open_hub_run(f"hf://{REPO}", api=FakeHubApi(repo))
    with HubDownloads(run, tmp_path, keep=False, cache_dir=cache, download=FakeDownload(repo)) as hub:
        for step in STEPS:
            hub.fetch(step)
            hub.release(step)
        assert hub.downloaded_bytes == os.path.getsize(run_dir / "checkpoint-8" / "model.safetensors")  # the only new blob
    assert old.read_bytes() == before


@pytest.mark.parametrize("shards", [1, 3])
def test_headers_over_range_requests_are_exactly_what_the_reader_reads_once_the_files_arrive(tmp_path, shards):
    run_dir, _, _ = make_run(tmp_path / "src", [5, 10], shards=shards)
    repo = FakeRepo(REPO)
    repo.commit(folder_files(run_dir))
    api = FakeHubApi(repo)
    run = open_hub_run(f"hf://{REPO}", api=api)
    with HubDownloads(run, tmp_path, keep=False, cache_dir=tmp_path / "cache", download=FakeDownload(repo)) as hub:
        planned = hub.source(10)
        assert planned.identities == {} and len(api.header_reads) == shards
        assert not (hub.folder / "checkpoint-10" / "model.safetensors").exists()
        arrived = hub.fetch(10)
        check_arrival(planned, arrived)
        assert list(planned.tensors) == list(arrived.tensors)
        local = load_source(run_dir / "checkpoint-10", 10).tensors.values()
        assert [(t.name, t.dtype, t.shape, t.path.name, t.start) for t in arrived.tensors.values()] == [
            (t.name, t.dtype, t.shape, t.path.name, t.start) for t in local
        ]
        name, info = next(iter(planned.tensors.items()))
        changed = dataclasses.replace(planned, tensors={**planned.tensors, name: dataclasses.replace(info, dtype="F16")})
        with pytest.raises(DataError, match=f"tensor '{name}' is not as planned from its header"):
            check_arrival(changed, arrived)


@pytest.fixture
def hub_client(tmp_path, pushed, monkeypatch):
    """huggingface_hub as bema-average uses it, against the fake repo: listing by the fake HfApi, downloads by a
    stand-in for hf_hub_download into a cache of the test's own."""
    import huggingface_hub

    from bema_offline.sources import hub

    cache = tmp_path / "cache"
    download = FakeDownload(pushed)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(hub, "make_hub_api", lambda: FakeHubApi(pushed))
    return cache, download


@pytest.mark.parametrize("keep", [True, False], ids=["keep-downloads", "no-keep-downloads"])
def test_average_of_a_hub_run_equals_the_local_run(tmp_path, local_run, hub_client, keep):
    """`average("hf://ORG/NAME", ...)`: the bytes of the local run's output. With keep_downloads=False the plan reads
    headers over range requests (no weights downloaded while planning), the step-major engine fetches and releases
    each step, and no downloaded weights stay in the cache."""
    run_dir, base_dir = local_run
    cache, download = hub_client
    schedule = BEMASchedule(update_freq=2)
    result = average(f"hf://{REPO}", tmp_path / "out", schedule=schedule, base_model=base_dir, keep_downloads=keep)
    average(run_dir, tmp_path / "local", schedule=schedule, base_model=base_dir)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    record = __import__("json").loads((tmp_path / "out" / "bema_offline.json").read_text())
    assert record["run_dir"] == f"hf://{REPO}" and result.plan.found_steps == STEPS
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bema-hub-")]  # its run folder is gone
    assert not any(call.endswith("optimizer.pt") or call.endswith("training_args.bin") for call in download.calls)
    blobs = cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    weights = [p for p in blobs.iterdir() if p.stat().st_size > 2000]
    assert bool(weights) is keep


def test_a_hub_run_from_the_command_line(tmp_path, local_run, hub_client, capsys):
    from cli.run_entry import run_cli

    from bema_offline.cli import average_command

    run_dir, base_dir = local_run
    args = [f"hf://{REPO}", "--base-model", base_dir, "--no-keep-downloads", "-o", tmp_path / "out", "-q"]
    code, _, err = run_cli(average_command, args, capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()  # --update-freq came from the run's trainer_state.json
    code, _, err = run_cli(average_command, [f"hf://{REPO}", "--base-model", base_dir], capsys)
    assert code == 2 and "is on the Hub: give --output" in err
    code, _, err = run_cli(average_command, [run_dir, "--base-model", base_dir, "--revisions", "step*", "-o", tmp_path / "o"], capsys)
    assert code == 2 and "--revisions applies to runs on the Hub" in err
    args = [f"hf://{REPO}", "--base-model", base_dir, "--no-keep-downloads", "--resume", "-o", tmp_path / "o2"]
    code, _, err = run_cli(average_command, args, capsys)
    assert code == 2 and "leave out --resume" in err
