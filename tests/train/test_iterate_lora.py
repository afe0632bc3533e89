"""LoRA rounds of `bema_offline.train.iterate`: real TRL DPO rounds of a peft adapter on a tiny Llama, fp32 on the CPU.

Round 2's reference is the merged BEMA of round 1's adapter checkpoints, bit for bit what `bema-average` makes of that
run; round 2 trains a new adapter on it, against it. The last checkpoint, merged where the next round or the
evaluation uses it, is `bema-average --method uniform --last 1` of the round, and peft's own merge within float32
rounding. A run killed while training an adapter resumes to the uninterrupted run's bits, and a changed LoRA setting
is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from hub_fake import FakeApi
from round_kills import kill_at_training_step, killed_child
from safetensors.torch import load_file
from tiny_dpo import make_preference_dataset, make_tiny_llama, make_tokenizer
from tiny_lora import EPS32, quiet
from transformers import LlamaForCausalLM

from bema_offline.cli import _run, average_entry
from bema_offline.errors import UsageError
from bema_offline.output import hub
from bema_offline.output.fingerprint import folder_fingerprint
from bema_offline.sources.run import find_checkpoints
from bema_offline.train.checkpoints import adapter_fingerprint
from bema_offline.train.dpo import lora_config
from bema_offline.train.iterate import IteratePlan, run_rounds

# fp32 on the CPU, deterministic, quiet
FAST = {"gradient_checkpointing": False, "use_cpu": True, "max_length": 32, "report_to": [], "disable_tqdm": True, "seed": 0}
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A base model, preference data and held-out pairs; one intra-op thread, the datasets cache in tmp."""
    root = tmp_path_factory.mktemp("iterate_lora")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "datasets_cache"))
        make_tiny_llama(root / "base", make_tokenizer(root / "tokenizer"))
        make_preference_dataset(8, seed=4).to_json(root / "prefs.jsonl")
        make_preference_dataset(6, seed=9).to_json(root / "heldout.jsonl")
        yield root
    torch.set_num_threads(threads)


def plan_for(data: Path, workdir: Path, **changes) -> IteratePlan:
    settings = dict(
        base_model=data / "base",
        datasets=(data / "prefs.jsonl",),
        rounds=2,
        workdir=workdir,
        save_steps=2,
        max_steps=4,
        learning_rate=2e-2,
        per_device_train_batch_size=2,
        bf16=False,
        config_overrides=FAST,
        lora=lora_config(**LORA),
    )
    return IteratePlan(**{**settings, **changes})


@pytest.fixture(scope="module")
def uninterrupted(data: Path):
    """Two LoRA rounds without interruption (BEMA reference, the policy from it), pushed to a fake Hub."""
    api = FakeApi()
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "get_token", lambda: "hf_test")
        patch.setattr(hub, "make_api", lambda token: api)
        plan = plan_for(data, data / "uninterrupted", push_to_hub="my-org/lora-rounds")
        record = run_rounds(plan, log=lines.append)
        yield plan, record, api, lines


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_of(workdir: Path) -> dict[str, str]:
    """What a LoRA run computed: the bytes of every checkpoint's adapter weights, and the weights of every merged
    model folder (averages and merged last checkpoints). The adapter configs are left out: they name the policy's
    folder, which is in another work folder for another run."""
    found = {}
    for folder in sorted(p for p in workdir.glob("round-*") if p.is_dir()):
        if (folder / "config.json").exists():
            found[folder.name] = folder_fingerprint(folder)
        for checkpoint in folder.glob("checkpoint-*"):
            found[f"{folder.name}/{checkpoint.name}"] = sha256(checkpoint / "adapter_model.safetensors")
    return found


def run_cli(command, args: list, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        _run(command, [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_round_2_trains_an_adapter_against_bema_average_of_round_1(data: Path, uninterrupted, capsys) -> None:
    """Round 2's reference and policy are, bit for bit, what `bema-average` makes of round 1's adapter run (finding
    its base in the adapter config); round 2's adapters sit on it, and its average merges them onto it."""
    plan, record, _, lines = uninterrupted
    work = plan.workdir
    first, second = record["rounds"]
    assert record["plan"]["lora"] == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
    code, _, err = run_cli(average_entry, [work / "round-1", "--update-freq", 2, "-o", data / "by-hand", "-q"], capsys)
    assert code == 0, err
    assert (data / "by-hand" / "model.safetensors").read_bytes() == (work / "round-1-bema" / "model.safetensors").read_bytes()
    bema = {"path": str(work / "round-1-bema"), "fingerprint": folder_fingerprint(data / "by-hand")}
    assert second["reference"] == {**bema, "kind": "bema"} and second["policy"] == bema
    # round 2 trained an adapter on round 1's BEMA, against it (the trainer checked its fingerprint after training)
    training = json.loads((work / "round-2" / "bema_offline_dpo.json").read_text())
    assert training["reference"]["fingerprint"] == bema["fingerprint"] and training["policy"]["path"] == bema["path"]
    assert training["lora"]["r"] == 4 and training["global_step"] == 4
    for entry in record["rounds"]:
        run_dir = Path(entry["training"]["output_dir"])
        assert entry["training"]["checkpoints"] == [2, 4] and entry["average"]["update_steps"] == [2, 4]
        for folder in find_checkpoints(run_dir).values():
            adapter = json.loads((folder / "adapter_config.json").read_text())
            assert adapter["base_model_name_or_path"] == entry["policy"]["path"] and adapter["r"] == 4
            assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.pt").exists()
        last = entry["training"]["last_checkpoint"]
        assert last == {"path": str(run_dir / "checkpoint-4"), "fingerprint": adapter_fingerprint(run_dir / "checkpoint-4")}
        assert "last_merged" not in entry["training"]  # neither the next round nor an evaluation needs it
        provenance = json.loads((Path(entry["average"]["path"]) / "bema_offline.json").read_text())
        assert provenance["base_model"] == entry["policy"]["path"]
    # the merge moved the weights the adapter targets, and round 2 moved them again
    name = "model.layers.0.self_attn.q_proj.weight"
    base, one, two = (load_file(folder / "model.safetensors")[name] for folder in (data / "base", work / "round-1-bema", work / "round-2-bema"))
    assert not torch.equal(base, one) and not torch.equal(one, two)
    assert not (work / "round-1-last").exists() and not (work / "round-2-last").exists()
    assert "round 2/2: training: policy a LoRA adapter on" in "\n".join(lines)
    assert "each round trains a LoRA adapter, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=all-linear" in (work / "rounds.md").read_text()


def test_lora_rounds_go_to_the_hub_as_model_folders(uninterrupted) -> None:
    _, record, api, _ = uninterrupted
    assert [u["revision"] for u in api.uploads] == ["round-1", "round-2"]
    assert all("model.safetensors" in u["files"] and "config.json" in u["files"] for u in api.uploads)
    assert not any("adapter_config.json" in u["files"] for u in api.uploads)
    card = [kwargs for method, _, kwargs in api.calls if method == "upload_file"][-1]["content"].decode()
    assert "each round trains a LoRA adapter" in card and "| 2 | round-1-bema |" in card


def test_resume_after_kills_in_lora_training_gives_the_uninterrupted_bits(data: Path, uninterrupted, tmp_path: Path) -> None:
    """Killed at step 3 of round 1 (after checkpoint-2), then at step 3 of round 2: each rerun resumes the adapter,
    its optimizer and scheduler from the newest checkpoint through the Trainer, and the run ends with the
    uninterrupted run's bits: every checkpoint's adapter weights and every merged average. (Determinism holds here:
    fp32, one thread, no dropout; TRL seeds before peft draws the adapter's A.)"""
    plan = plan_for(data, tmp_path / "work")
    work = plan.workdir
    killed_child(plan, kill_at_training_step(3))
    assert sorted(find_checkpoints(work / "round-1")) == [2]
    assert (work / "round-1" / "checkpoint-2" / "optimizer.pt").is_file()
    assert (work / "round-1" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    killed_child(plan, kill_at_training_step(2 + 3))  # round 1's steps 3 and 4, then round 2's third
    record = json.loads((work / "rounds.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [1] and record["in_progress"]["round"] == 2
    assert record["rounds"][0]["training"]["resumed_from"] == "checkpoint-2"
    assert sorted(find_checkpoints(work / "round-2")) == [2]

    record = run_rounds(plan, log=lambda line: None)
    assert [r["training"]["resumed_from"] for r in record["rounds"]] == ["checkpoint-2", "checkpoint-2"]
    expected = weights_of(uninterrupted[0].workdir)
    assert weights_of(work) == expected and len(expected) == 6
    for resumed, reference in zip(record["rounds"], uninterrupted[1]["rounds"]):
        assert resumed["average"]["fingerprint"] == reference["average"]["fingerprint"]
        assert resumed["average"]["effective_weights"] == reference["average"]["effective_weights"]


def test_a_changed_lora_setting_is_refused(data: Path, uninterrupted) -> None:
    plan, _, _, _ = uninterrupted
    before = weights_of(plan.workdir)
    offline = dataclasses.replace(plan, push_to_hub=None)
    for change, message in [
        (dict(lora=lora_config(**{**LORA, "r": 8})), "another plan: --lora-r was 4, now 8; rerun with the options of that run"),
        (dict(lora=lora_config(**LORA, pairs=["use_rslora=true"])), "another plan: --lora-set use_rslora was not set, now True;"),
        (dict(lora=lora_config(**{**LORA, "target_modules": "q_proj,v_proj"})), r"--lora-target-modules was all-linear, now \['q_proj', 'v_proj'\]"),
        (dict(lora=None), r"another plan: --lora-alpha was 8, now not set \(and 3 more\)"),
    ]:
        with pytest.raises(UsageError, match=message):
            run_rounds(dataclasses.replace(offline, **change), log=lambda line: None)
    # peft's defaults given explicitly are the same plan: nothing is trained again
    lines: list[str] = []
    same = dataclasses.replace(offline, lora=lora_config(**LORA, lora_dropout=0.0, pairs=["use_rslora=false", "bias=none"]))
    run_rounds(same, log=lines.append)
    assert sum("finished before; reusing" in line for line in lines) == 2
    assert weights_of(plan.workdir) == before


def test_the_last_checkpoint_merged_for_the_next_policy_and_the_evaluation(data: Path, uninterrupted, tmp_path: Path, capsys) -> None:
    """--policy-init last with eval data: each round's last adapter checkpoint is merged onto the round's policy
    (round-K-last/), bit for bit `bema-average --method uniform --last 1` and peft's merge_and_unload within float32
    rounding; round 2 starts from it, and the evaluation scores it as the last checkpoint. Eval data given to a
    finished run merges the last checkpoints then."""
    from peft import PeftModel

    plan = plan_for(data, tmp_path / "work", policy_init="last", eval_data=data / "heldout.jsonl")
    record = run_rounds(plan, log=lambda line: None)
    first, second = record["rounds"]
    merged = {"path": str(plan.workdir / "round-1-last"), "fingerprint": folder_fingerprint(plan.workdir / "round-1-last")}
    assert first["training"]["last_merged"] == merged and second["policy"] == merged
    assert second["reference"]["path"] == str(plan.workdir / "round-1-bema")
    for entry in record["rounds"]:
        folder, run_dir = Path(entry["training"]["last_merged"]["path"]), Path(entry["training"]["output_dir"])
        by_hand = tmp_path / f"by-hand-{entry['round']}"
        args = [run_dir, "--method", "uniform", "--last", 1, "--base-model", entry["policy"]["path"], "-o", by_hand, "-q"]
        assert run_cli(average_entry, args, capsys)[0] == 0
        assert (by_hand / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
        policy = quiet(LlamaForCausalLM.from_pretrained, entry["policy"]["path"], dtype=torch.float32)
        peft_merge = quiet(PeftModel.from_pretrained(policy, run_dir / "checkpoint-4").merge_and_unload).state_dict()
        ours = load_file(folder / "model.safetensors")
        for name, tensor in ours.items():
            assert torch.allclose(tensor, peft_merge[name], rtol=4 * EPS32, atol=4 * EPS32 * float(peft_merge[name].abs().max())), name
        assert set(entry["eval"]["scores"]) == {"reference", "last checkpoint", "average"}
    assert first["eval"]["scores"]["last checkpoint"] != first["eval"]["scores"]["average"]

    # the uninterrupted run had no eval data: given now, it merges each last checkpoint and trains nothing
    source = uninterrupted[0].workdir
    work = tmp_path / "later"
    shutil.copytree(source, work)
    (work / "rounds.json").write_text((source / "rounds.json").read_text().replace(str(source), str(work)))
    lines: list[str] = []
    again = run_rounds(dataclasses.replace(uninterrupted[0], workdir=work, push_to_hub=None, eval_data=data / "heldout.jsonl"), log=lines.append)
    assert sum("merging the last checkpoint" in line for line in lines) == 2 and not any("training:" in line for line in lines)
    for entry in again["rounds"]:
        assert entry["training"]["last_merged"]["path"] == str(work / f"round-{entry['round']}-last")
        assert "last checkpoint" in entry["eval"]["scores"]


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["init_lora_weights=pissa"], "--lora-set init_lora_weights=pissa: init_lora_weights 'pissa' changes the base weights at init"),
        (["init_lora_weights=false"], "--lora-set init_lora_weights=false: init_lora_weights is false (random A and B)"),
        (["layer_replication=[[0, 1]]"], "--lora-set: the adapter uses layer replication (layer_replication), which bema-offline cannot average; leave that setting out"),
    ],
)
def test_an_adapter_the_averages_cannot_merge_is_refused_before_training(data: Path, tmp_path: Path, pairs: list, message: str) -> None:
    with pytest.raises(UsageError) as error:
        run_rounds(plan_for(data, tmp_path / "work", lora=lora_config(**LORA, pairs=pairs)), log=lambda line: None)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "work").exists()
