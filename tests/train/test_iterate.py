"""`bema_offline.train.iterate`: real TRL DPO rounds on a tiny Llama, their averages (BEMA, and another method as the
reference) and record, the per-round evaluation against TRL's own DPO metrics and a float64 loss, Hub pushes, and
resuming after real SIGKILLs (while training, while averaging, between rounds) to the same bits as a run that was
never interrupted."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from hub_fake import FakeApi
from round_kills import kill_at_training_step, killed_child
from safetensors.torch import load_file
from tiny_dpo import make_preference_dataset, make_tiny_llama, make_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from bema_offline import BEMASchedule, faults
from bema_offline.errors import DataError, UsageError
from bema_offline.methods.registry import make_method
from bema_offline.methods.windows import Uniform
from bema_offline.output import hub
from bema_offline.output.fingerprint import folder_fingerprint
from bema_offline.sources.run import find_checkpoints
from bema_offline.train import iterate
from bema_offline.train.iterate import IteratePlan, data_fingerprint, run_rounds
from bema_offline.train.rounds_eval import evaluate_round

# fp32 on the CPU, deterministic, quiet
FAST = {"gradient_checkpointing": False, "use_cpu": True, "max_length": 32, "report_to": [], "disable_tqdm": True, "seed": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A base model, preference data and held-out pairs; one intra-op thread, the datasets cache in tmp."""
    root = tmp_path_factory.mktemp("iterate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "datasets_cache"))
        make_tiny_llama(root / "base", make_tokenizer(root / "tokenizer"))
        make_preference_dataset(8, seed=4).to_json(root / "prefs.jsonl")
        make_preference_dataset(6, seed=9).to_json(root / "heldout.jsonl")
        words = "the cat sat on a mat and the dog ran to the red box".split()
        (root / "heldout-text.jsonl").write_text("".join(json.dumps({"text": " ".join(words[i : i + 6])}) + "\n" for i in range(0, 9, 2)))
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
        learning_rate=1e-3,
        per_device_train_batch_size=2,
        bf16=False,
        config_overrides=FAST,
    )
    return IteratePlan(**{**settings, **changes})


@pytest.fixture(scope="module")
def pushed(data: Path):
    """Two rounds without interruption, scored on held-out pairs and pushed to a fake Hub."""
    api = FakeApi()
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "get_token", lambda: "hf_test")
        patch.setattr(hub, "make_api", lambda token: api)
        plan = plan_for(data, data / "uninterrupted", eval_data=data / "heldout.jsonl", push_to_hub="my-org/rounds")
        record = run_rounds(plan, log=lines.append)
        yield plan, record, api, lines


def weights_of(workdir: Path) -> dict[str, str]:
    """The fingerprint of every model folder a run wrote: each round's checkpoints and average."""
    folders = [p for p in workdir.glob("round-*") if p.is_dir()]
    folders += [checkpoint for folder in folders for checkpoint in folder.glob("checkpoint-*")]
    return {p.relative_to(workdir).as_posix(): folder_fingerprint(p) for p in folders if (p / "config.json").exists()}


def test_two_rounds_and_their_record(data: Path, pushed) -> None:
    plan, record, _, lines = pushed
    work = plan.workdir
    assert json.loads((work / "rounds.json").read_text()) == record
    base = {"path": str(data / "base"), "fingerprint": folder_fingerprint(data / "base")}
    assert record["plan"]["base_model"] == base
    assert record["plan"]["average"] == {"method": "bema", **BEMASchedule(update_freq=2).to_dict()}  # every parameter
    assert record["plan"]["dpo"]["beta"] == 0.1 and record["plan"]["dpo"]["max_length"] == 32  # TRL's default, resolved
    assert record["in_progress"] is None
    first, second = record["rounds"]
    # round 1 trains from the base against the base; round 2's reference and policy are round 1's BEMA
    assert first["reference"] == {**base, "kind": "base"} and first["policy"] == base
    average = {"path": str(work / "round-1-bema"), "fingerprint": folder_fingerprint(work / "round-1-bema")}
    assert second["reference"] == {**average, "kind": "bema"} and second["policy"] == average
    assert first["average"]["fingerprint"] != base["fingerprint"]
    for entry in record["rounds"]:
        run_dir = Path(entry["training"]["output_dir"])
        assert entry["training"]["checkpoints"] == sorted(find_checkpoints(run_dir)) == [2, 4]
        assert entry["training"]["global_step"] == 4 and entry["training"]["resumed_from"] is None
        assert entry["dataset"] == {"path": str(data / "prefs.jsonl"), "fingerprint": data_fingerprint(data / "prefs.jsonl")}
        assert entry["average"]["update_steps"] == [2, 4] and entry["average"]["step"] == 4
        assert entry["average"]["method"] == record["plan"]["average"] and entry["average"]["label"] == "bema"
        weights = entry["average"]["effective_weights"]
        assert list(weights) == ["0", "2", "4"] and abs(sum(weights.values()) - 1) < 1e-12
        assert entry["average"]["theta0"] == entry["policy"]["path"]
        provenance = json.loads((Path(entry["average"]["path"]) / "bema_offline.json").read_text())
        assert provenance["base_model"] == entry["policy"]["path"]  # θ0 of the average is where the round started
        assert json.loads((run_dir / "bema_offline_dpo.json").read_text())["reference"]["fingerprint"] == entry["reference"]["fingerprint"]
        # once a round is over no checkpoint keeps the optimizer state: only the model files the average reads
        for folder in find_checkpoints(run_dir).values():
            assert (folder / "model.safetensors").is_file() and not (folder / "optimizer.pt").exists()
            assert not list(folder.glob("rng_state*")) and not (folder / "scheduler.pt").exists()
    assert not (work / ".bema-iterate.lock").exists()
    assert "round 1/2: training: policy" in "\n".join(lines) and lines[-1].startswith("done: 2 rounds; the last average is")


def trl_dpo_metrics(policy: Path, reference: Path, data: Path, output_dir: Path, *, beta: float, max_length: int) -> dict:
    """TRL's own DPOTrainer.evaluate() on the whole data as one batch (so that its mean of batch means is the mean over
    every pair), in fp32 on the CPU."""
    from trl import DPOConfig, DPOTrainer

    dataset = datasets.Dataset.from_json(str(data))
    with warnings.catch_warnings():  # transformers' deprecation of the gradient_checkpointing names TRL uses
        warnings.simplefilter("ignore", FutureWarning)
        config = DPOConfig(
            output_dir=str(output_dir), beta=beta, max_length=max_length, per_device_eval_batch_size=len(dataset),
            use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], disable_tqdm=True,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(policy), ref_model=AutoModelForCausalLM.from_pretrained(reference),
            args=config, train_dataset=dataset, eval_dataset=dataset, processing_class=PreTrainedTokenizerFast.from_pretrained(reference),
        )  # fmt: skip
        return trainer.evaluate()


def test_each_round_is_evaluated_with_trls_dpo_metrics(data: Path, pushed, tmp_path: Path) -> None:
    """The scores of every model of every round equal TRL's DPOTrainer.evaluate() with the run's β and max_length,
    against the base model; the base scores 0 against itself, and a model of an earlier round is not evaluated again."""
    _, record, _, lines = pushed
    first, second = record["rounds"]
    assert first["eval"]["scores"]["reference"]["reward_accuracy"] == 0.0 and first["eval"]["scores"]["reference"]["reward_margin"] == 0.0
    assert second["eval"]["scores"]["reference"] == first["eval"]["scores"]["average"]  # round 1's BEMA, evaluated once
    assert sum("evaluating the" in line for line in lines) == 2
    assert "round 2/2: evaluating the last checkpoint, the average on" in "\n".join(lines)
    assert first["eval"]["data"]["kind"] == "preference" and first["eval"]["data"]["rows"] == 6
    assert first["eval"]["key"]["data"] == data_fingerprint(data / "heldout.jsonl") and first["eval"]["key"]["max_length"] == 32
    assert list(first["eval"]["metrics"]) == ["reward_accuracy", "reward_margin", "dpo_loss", "chosen_loss", "reward_chosen", "reward_rejected"]
    for entry in record["rounds"]:
        for role, model in [("last checkpoint", entry["training"]["last_checkpoint"]), ("average", entry["average"])]:
            ours = entry["eval"]["scores"][role]
            theirs = trl_dpo_metrics(Path(model["path"]), data / "base", data / "heldout.jsonl", tmp_path / "trl", beta=0.1, max_length=32)
            assert ours["reward_accuracy"] * 6 == round(theirs["eval_rewards/accuracies"] * 6)
            assert ours["reward_margin"] == pytest.approx(theirs["eval_rewards/margins"], rel=1e-4, abs=1e-7)  # TRL sums in fp32
            assert ours["dpo_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
            assert ours["reward_chosen"] == pytest.approx(theirs["eval_rewards/chosen"], rel=1e-4, abs=1e-7)
    assert any(entry["eval"]["scores"]["average"]["reward_margin"] != 0 for entry in record["rounds"])


def test_pairs_cut_by_max_length_are_evaluated_as_trl_does(data: Path, pushed, tmp_path: Path) -> None:
    """With a max_length that cuts most pairs and leaves some with no completion token, the scores still equal
    TRL's (which drops a pair whose prompt fills max_length, and keeps the start of the others)."""
    plan, record, _, _ = pushed
    entry = copy.deepcopy(record["rounds"][1])
    del entry["eval"]
    short = {**record["plan"], "dpo": {**record["plan"]["dpo"], "max_length": 6}}
    assert evaluate_round(plan, short, entry, [], log=lambda line: None, rounds=2)
    assert entry["eval"]["data"]["dropped_rows"] > 0 and entry["eval"]["data"]["truncated_sequences"] > 0
    assert "rows left out (no token to score within max_length 6)" in entry["eval"]["description"]
    ours = entry["eval"]["scores"]["average"]
    theirs = trl_dpo_metrics(Path(entry["average"]["path"]), data / "base", data / "heldout.jsonl", tmp_path / "trl", beta=0.1, max_length=6)
    pairs = entry["eval"]["data"]["rows"]
    assert ours["reward_accuracy"] * pairs == round(theirs["eval_rewards/accuracies"] * pairs)
    assert ours["reward_margin"] == pytest.approx(theirs["eval_rewards/margins"], rel=1e-4, abs=1e-7)
    assert ours["dpo_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
    assert not evaluate_round(plan, short, entry, [], log=lambda line: None, rounds=2)  # the same key: nothing to do


def test_rounds_table_and_plot(pushed) -> None:
    plan, record, _, lines = pushed
    second = record["rounds"][1]
    table = (plan.workdir / "rounds.md").read_text()
    assert "| 2 | round-1-bema | round-1-bema | prefs.jsonl | 4 | 2, 4 | round-2-bema |" in table
    assert "Evaluation: DPO implicit rewards against the base model (β = 0.1) on 6 held-out pairs of heldout.jsonl" in table
    assert "| round | model | reward accuracy ↑ | reward margin ↑ | dpo loss ↓ | chosen loss ↓ | reward chosen ↑ | reward rejected ↓ |" in table
    scores = second["eval"]["scores"]["average"]
    assert f"| 2 | BEMA | {scores['reward_accuracy']:.6f} | {scores['reward_margin']:.6f} | {scores['dpo_loss']:.6f} |" in table
    assert "| 1 | reference | 0.000000 | 0.000000 | 0.693147 |" in table  # the base against itself: log 2
    assert table.startswith("\n".join(lines[-2].splitlines()[:3]))  # the same table went to the log
    assert (plan.workdir / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_eval_data_evaluates_every_round_again(data: Path, pushed, tmp_path: Path) -> None:
    """Text data gives loss and perplexity, equal to a float64 computation over every token of every row; the
    rounds are not trained again."""
    plan, _, _, _ = pushed
    work = tmp_path / "work"
    shutil.copytree(plan.workdir, work)
    (work / "rounds.json").write_text((plan.workdir / "rounds.json").read_text().replace(str(plan.workdir), str(work)))
    text_plan = dataclasses.replace(plan, workdir=work, push_to_hub=None, eval_data=data / "heldout-text.jsonl")
    lines: list[str] = []
    again = run_rounds(text_plan, log=lines.append)
    assert sum("finished before; reusing" in line for line in lines) == 2
    tokenizer = PreTrainedTokenizerFast.from_pretrained(data / "base")
    rows = [json.loads(line)["text"] for line in (data / "heldout-text.jsonl").read_text().splitlines()]
    for entry in again["rounds"]:
        assert list(entry["eval"]["scores"]["average"]) == ["loss", "perplexity"]
        model = AutoModelForCausalLM.from_pretrained(entry["average"]["path"]).eval()
        total, tokens = 0.0, 0
        for text in rows:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()
            total -= torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).sum().item()
            tokens += ids.shape[1] - 1
        assert entry["eval"]["scores"]["average"]["loss"] == pytest.approx(total / tokens, rel=1e-6)
    table = (work / "rounds.md").read_text()
    assert "Evaluation: loss per token on 5 held-out text rows of heldout-text.jsonl" in table and "| round | model | loss ↓ | perplexity ↓ |" in table


def test_each_round_goes_to_its_branch_and_the_table_to_main(pushed) -> None:
    _, record, api, _ = pushed
    assert [(u["repo_id"], u["revision"]) for u in api.uploads] == [("my-org/rounds", "round-1"), ("my-org/rounds", "round-2")]
    assert all("model.safetensors" in u["files"] and "bema_offline.json" in u["files"] for u in api.uploads)
    cards = [kwargs for method, _, kwargs in api.calls if method == "upload_file"]
    assert [c["path_in_repo"] for c in cards] == ["README.md", "README.md"]
    card = cards[-1]["content"].decode()
    assert "| 2 | round-1-bema |" in card and 'revision="round-2"' in card and "- iterative-dpo" in card
    assert str(record["plan"]["base_model"]["path"]) not in card and "/tmp" not in card  # no local path goes to the Hub
    assert record["rounds"][1]["push"] == {"repo": "my-org/rounds", "revision": "round-2", "fingerprint": record["rounds"][1]["average"]["fingerprint"]}


def test_a_finished_run_is_reused_and_a_changed_plan_refused(data: Path, pushed, monkeypatch) -> None:
    plan, record, api, _ = pushed
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub, "make_api", lambda token: api)
    before = weights_of(plan.workdir)
    calls = len(api.calls)
    lines: list[str] = []
    again = run_rounds(plan, log=lines.append)
    assert [r["average"] for r in again["rounds"]] == [r["average"] for r in record["rounds"]]
    assert sum("finished before; reusing" in line for line in lines) == 2
    assert len(api.calls) == calls  # nothing pushed twice
    for change, message in [
        (dict(beta=0.2), "another plan: --beta was 0.1, now 0.2; rerun with the options of that run"),
        (dict(reference="ema", policy_init="last"), r"another plan: --reference was bema, now ema \(and 1 more\)"),
        (dict(method=make_method("bema", {"ema_power": 0.3}, schedule=BEMASchedule(update_freq=2))), "another plan: --ema-power was 0.5, now 0.3;"),
        (dict(config_overrides={**FAST, "warmup_steps": 1}), "another plan: --config-set warmup_steps was not set, now 1"),
        (dict(datasets=(data / "heldout.jsonl",)), f"--dataset {data / 'heldout.jsonl'}: round 1 was trained on other data"),
        (dict(rounds=1), "--rounds 1: --workdir"),
    ]:
        with pytest.raises(UsageError, match=message):
            run_rounds(dataclasses.replace(plan, **change), log=lines.append)
    assert weights_of(plan.workdir) == before
    # an average changed behind the run's back is not reused
    changed = dataclasses.replace(plan, push_to_hub=None, eval_data=None, workdir=plan.workdir.parent / "changed")
    shutil.copytree(plan.workdir, changed.workdir)
    (changed.workdir / "rounds.json").write_text((plan.workdir / "rounds.json").read_text().replace(str(plan.workdir), str(changed.workdir)))
    shutil.copy(data / "base" / "model.safetensors", changed.workdir / "round-1-bema" / "model.safetensors")
    with pytest.raises(DataError, match="round-1-bema: round 1's average changed since rounds.json recorded it"):
        run_rounds(changed, log=lines.append)


@pytest.mark.parametrize(("reference", "policy_init"), [("base", None), ("last", "reference")])
def test_other_references(data: Path, tmp_path: Path, reference: str, policy_init: str | None) -> None:
    plan = plan_for(data, tmp_path / "work", reference=reference, policy_init=policy_init, max_steps=3, rounds=2)
    record = run_rounds(plan, log=lambda line: None)
    first, second = record["rounds"]
    last = {"path": str(tmp_path / "work" / "round-1" / "checkpoint-3"), "fingerprint": first["training"]["last_checkpoint"]["fingerprint"]}
    assert last["fingerprint"] == folder_fingerprint(last["path"])
    if reference == "base":  # plain multi-round DPO: a fixed reference, the policy goes on from the last checkpoint
        assert second["reference"] == {**record["plan"]["base_model"], "kind": "base"} and second["policy"] == last
    else:
        assert second["reference"] == {**last, "kind": "last"} and second["policy"] == last
    # the last checkpoint (3) is off the save grid: the average ignores it
    assert first["average"]["update_steps"] == [2] and first["average"]["ignored_steps"] == [3]


def test_a_method_of_bema_average_as_the_reference(data: Path, tmp_path: Path) -> None:
    """--reference uniform --last 2: each round's average is the mean of its two newest checkpoints (against a float64
    mean of their tensors), round 2 trains from and against round 1's, and another parameter is refused."""
    plan = plan_for(data, tmp_path / "work", reference="uniform", method=Uniform(last=2), max_steps=6)
    record = run_rounds(plan, log=lambda line: None)
    assert record["plan"]["average"] == {"method": "uniform", "last": 2, "window": None}
    first, second = record["rounds"]
    average = {"path": str(plan.workdir / "round-1-uniform"), "fingerprint": first["average"]["fingerprint"]}
    assert second["reference"] == {**average, "kind": "uniform"} and second["policy"] == average
    for entry in record["rounds"]:
        folder, run_dir = Path(entry["average"]["path"]), Path(entry["training"]["output_dir"])
        assert entry["average"]["effective_weights"] == {"4": 0.5, "6": 0.5} and entry["average"]["update_steps"] is None
        assert entry["average"]["label"] == "uniform-last2" and entry["average"]["kind"] == "uniform"
        assert json.loads((folder / "bema_offline.json").read_text())["method"] == record["plan"]["average"]
        averaged = load_file(folder / "model.safetensors")
        four, six = (load_file(run_dir / f"checkpoint-{step}" / "model.safetensors") for step in (4, 6))
        assert averaged.keys() == four.keys()
        for name, tensor in averaged.items():
            expected = ((four[name].double() + six[name].double()) / 2).float()  # one rounding of the exact mean
            assert torch.equal(tensor, expected), name
        assert not torch.equal(averaged["model.norm.weight"], six["model.norm.weight"])
    assert "| round | reference | policy start |" in (plan.workdir / "rounds.md").read_text()
    for change, message in [
        (dict(method=Uniform(last=1)), "another plan: --last was 2, now 1; rerun"),
        (dict(reference="bema", method=None), "another plan: --reference was uniform, now bema; rerun"),
    ]:
        with pytest.raises(UsageError, match=message):
            run_rounds(dataclasses.replace(plan, **change), log=lambda line: None)


def test_bad_plans_are_one_line(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    for change, message in [
        (dict(datasets=(data / "prefs.jsonl",) * 3), r"--dataset given 3 times; give it once, or once per round \(2\)"),
        (dict(reference="base", policy_init="reference"), "would start every round from the base again; use --policy-init last"),
        (dict(config_overrides={"save_total_limit": 1}), "--config-set save_total_limit: not allowed, the average of each round needs all its checkpoints"),
        (dict(datasets=(data / "missing.jsonl",)), f"--dataset {data / 'missing.jsonl'}: no such file or folder"),
        (dict(eval_data=data / "base" / "config.json"), "--eval-data .*config.json: found columns"),  # before round 1, not after
    ]:
        with pytest.raises((UsageError, DataError), match=message):
            run_rounds(plan_for(data, work, **change), log=lambda line: None)
    assert not work.exists()
    work.mkdir()
    (work / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match="holds files but no rounds.json; choose a new or empty folder"):
        run_rounds(plan_for(data, work), log=lambda line: None)


# --- resuming after real kills -----------------------------------------------------------------------------------


def kill_when_round_2_starts() -> None:
    def train_dpo(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    iterate.train_dpo = train_dpo


def test_resume_after_kills_gives_the_uninterrupted_bits(data: Path, pushed, tmp_path: Path) -> None:
    """Killed at step 3 of round 1 (after checkpoint-2), then while writing round 1's average, then between the
    rounds: each rerun goes on from where the last stopped, and the end result is the uninterrupted run's, bit for
    bit (every checkpoint's and average's weights, the effective weights)."""
    plan = plan_for(data, tmp_path / "work")
    work = plan.workdir

    killed_child(plan, kill_at_training_step(3))
    record = json.loads((work / "rounds.json").read_text())
    assert record["rounds"] == [] and record["in_progress"]["round"] == 1
    assert sorted(find_checkpoints(work / "round-1")) == [2]
    assert (work / "round-1" / "checkpoint-2" / "optimizer.pt").is_file()  # the newest keeps what resuming needs

    killed_child(plan, lambda: faults.arm("write", 1, "kill"))
    assert json.loads((work / "round-1" / "bema_offline_dpo.json").read_text())["resumed_from"] == "checkpoint-2"
    assert sorted(find_checkpoints(work / "round-1")) == [2, 4]
    assert (work / ".round-1-bema.bema-partial").is_dir() and not (work / "round-1-bema").exists()
    assert json.loads((work / "rounds.json").read_text())["rounds"] == []

    killed_child(plan, kill_when_round_2_starts)
    record = json.loads((work / "rounds.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [1] and record["in_progress"]["round"] == 2
    assert not (work / ".round-1-bema.bema-partial").exists()

    lines: list[str] = []
    record = run_rounds(plan, log=lines.append)
    assert "round 1/2: finished before; reusing" in lines[0]
    assert record["rounds"][0]["training"]["resumed_from"] == "checkpoint-2"
    uninterrupted, _, _, _ = pushed
    assert weights_of(work) == weights_of(uninterrupted.workdir)
    for resumed, reference in zip(record["rounds"], pushed[1]["rounds"]):
        assert resumed["average"]["effective_weights"] == reference["average"]["effective_weights"]
        assert resumed["average"]["fingerprint"] == reference["average"]["fingerprint"]


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path, link):
    from bema_offline.train.iterate import LOCK_FILE, WorkdirLock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (os.symlink if link == "symlink" else os.link)(victim, workdir / LOCK_FILE)
    with pytest.raises(DataError, match=LOCK_FILE):
        with WorkdirLock(workdir):
            pass
    assert victim.read_text() == "precious data"
    with WorkdirLock(tmp_path):  # an ordinary lock: made, and removed at the end
        assert (tmp_path / LOCK_FILE).read_text() == str(os.getpid())
    assert not (tmp_path / LOCK_FILE).exists()
