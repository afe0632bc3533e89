"""Iterative DPO with a BEMA reference: real TRL rounds on a tiny Llama, on the CPU.

Round 1 trains from the base with TRL and writes checkpoints; `average` makes their BEMA; round 2 trains
against that average. The reference inside TRL's trainer must be the averaged weights bit for bit, a separate
frozen object, and precomputed reference log-probs must be the averaged model's.

trl, transformers and datasets are dev dependencies and are imported plainly: missing is a failure, not a skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bema_offline import BEMASchedule, average
from bema_offline.train.dpo import RECORD_FILE, build_trainer, train_dpo
from bema_offline.errors import DataError
from bema_offline.output.fingerprint import folder_fingerprint

from tiny_dpo import make_preference_dataset, make_tiny_llama, make_tokenizer

# Fast, deterministic CPU settings for every round.
FAST = {
    "gradient_checkpointing": False,
    "use_cpu": True,
    "max_length": 32,
    "logging_steps": 4,
    "report_to": [],
    "disable_tqdm": True,
    "lr_scheduler_type": "constant",
    "seed": 0,
    "dataloader_num_workers": 0,
}
ROUND = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 2, "bf16": False}


class Rounds:
    """Round 1 from the base, and its BEMA."""

    def __init__(self, root: Path) -> None:
        tokenizer = make_tokenizer(root / "tokenizer")
        make_tiny_llama(root / "base", tokenizer, seed=0)
        make_preference_dataset(16, seed=1).to_json(root / "prefs.jsonl")
        self.root, self.base, self.prefs = root, root / "base", root / "prefs.jsonl"
        self.round1 = train_dpo(self.base, self.prefs, root / "round1", config_overrides=FAST, log=_quiet, **ROUND)
        self.bema = root / "round1-bema"
        average(root / "round1", self.bema, schedule=BEMASchedule(update_freq=2), base_model=self.base)


def _quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_local_cache(tmp_path_factory):
    """One intra-op thread (the model is tiny; threads only add contention), and the datasets cache in tmp."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, one_thread_and_local_cache) -> Rounds:
    return Rounds(tmp_path_factory.mktemp("dpo"))


def completion_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Sum of log p(completion token | everything before it), computed plainly with the model's logits.

    The sequence's first token has no context and is not scored (as in TRL), even when it starts the completion.
    """
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logps = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]  # logps[t] scores ids[t + 1]
    return logps[max(len(prompt_ids) - 1, 0) :].sum().item()


def test_round1_writes_checkpoints_for_bema_average(rounds: Rounds) -> None:
    run = rounds.root / "round1"
    assert rounds.round1.checkpoints == [2, 4]
    for step in (2, 4):
        folder = run / f"checkpoint-{step}"
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        assert (folder / "tokenizer.json").is_file()  # the next round can load its tokenizer from an average
        assert not (folder / "optimizer.pt").exists()  # save_only_model: checkpoints are for averaging
    record = json.loads((run / RECORD_FILE).read_text())
    assert record["reference"]["fingerprint"] == folder_fingerprint(rounds.base)
    assert record["checkpoints"] == [2, 4] and record["dpo"]["save_steps"] == 2
    base = load_file(rounds.base / "model.safetensors")
    last = load_file(run / "checkpoint-4" / "model.safetensors")
    assert max((last[k] - base[k]).abs().max().item() for k in base) > 1e-3  # training moved the weights


def test_the_average_of_round1_knows_it_was_dpo(rounds: Rounds) -> None:
    card = (rounds.bema / "README.md").read_text()
    provenance = json.loads((rounds.bema / "bema_offline.json").read_text())
    assert provenance["steps"]["update_steps_used"] == [2, 4]
    assert provenance["training"]["method"] == "dpo" and "- dpo" in card and "- trl" in card


def test_round2_reference_is_the_average_bit_for_bit_and_frozen(rounds: Rounds) -> None:
    trainer, setup = build_trainer(rounds.bema, rounds.prefs, rounds.root / "round2", config_overrides=FAST, log=_quiet, **ROUND)
    averaged = load_file(rounds.bema / "model.safetensors")
    base = load_file(rounds.base / "model.safetensors")
    assert any(not torch.equal(averaged[k], base[k]) for k in averaged)  # the average is not the base

    def assert_reference_is_the_average() -> None:
        state = trainer.ref_model.state_dict()
        for name, tensor in averaged.items():
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
        assert torch.equal(state["lm_head.weight"], averaged["model.embed_tokens.weight"])  # tied

    assert setup.fingerprint == folder_fingerprint(rounds.bema)
    assert_reference_is_the_average()
    reference, policy = trainer.ref_model, trainer.model
    assert reference is not policy
    reference_storage = {p.data_ptr() for p in reference.parameters()}
    assert not reference_storage & {p.data_ptr() for p in policy.parameters()}  # no shared weights
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    assert all(p.requires_grad for p in policy.parameters())

    trainer.train()
    assert trainer.ref_model is reference
    assert_reference_is_the_average()  # training left the reference untouched
    trained = load_file(rounds.root / "round2" / "checkpoint-4" / "model.safetensors")
    assert max((trained[k] - averaged[k]).abs().max().item() for k in averaged) > 1e-3  # the policy moved


def test_precomputed_reference_logps_are_the_averaged_models(rounds: Rounds) -> None:
    trainer, _ = build_trainer(
        rounds.bema, rounds.prefs, rounds.root / "round2-precompute", precompute_ref_log_probs=True,
        config_overrides=FAST, log=_quiet, **ROUND,
    )  # fmt: skip
    assert trainer.ref_model is None  # released after the precompute
    data = trainer.train_dataset
    averaged = AutoModelForCausalLM.from_pretrained(rounds.bema, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(rounds.base, dtype=torch.float32).eval()
    precomputed, ours, theirs_base = [], [], []
    for row in data:
        for side in ("chosen", "rejected"):
            precomputed.append(row[f"ref_{side}_logps"])
            ours.append(completion_logps(averaged, row["prompt_ids"], row[f"{side}_ids"]))
            theirs_base.append(completion_logps(base, row["prompt_ids"], row[f"{side}_ids"]))
    precomputed, ours, theirs_base = map(torch.tensor, (precomputed, ours, theirs_base))
    assert len(precomputed) == 32
    torch.testing.assert_close(precomputed, ours, rtol=0, atol=1e-4)
    assert (precomputed - theirs_base).abs().max() > 1e-2  # the base model's would not pass


def test_frozen_policy_parameters_stay_exact_through_training_and_averaging(rounds: Rounds) -> None:
    policy = AutoModelForCausalLM.from_pretrained(rounds.bema, dtype=torch.float32)
    policy.model.embed_tokens.requires_grad_(False)  # tied: lm_head is the same parameter
    norm = "model.layers.0.input_layernorm.weight"
    policy.get_parameter(norm).requires_grad_(False)
    run = rounds.root / "round2-frozen"
    result = train_dpo(rounds.bema, rounds.prefs, run, policy=policy, config_overrides=FAST, log=_quiet, **ROUND)
    average(run, rounds.root / "round2-frozen-bema", schedule=BEMASchedule(update_freq=2), base_model=rounds.bema)
    theta0 = load_file(rounds.bema / "model.safetensors")
    for folder in [run / f"checkpoint-{s}" for s in result.checkpoints] + [rounds.root / "round2-frozen-bema"]:
        tensors = load_file(folder / "model.safetensors")
        for name in ("model.embed_tokens.weight", norm):
            assert torch.equal(tensors[name], theta0[name]), (folder, name)
        assert not torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], theta0["model.layers.0.mlp.up_proj.weight"])


def test_a_reference_that_is_not_its_folder_is_refused(rounds: Rounds, tmp_path: Path) -> None:
    from bema_offline.train.dpo import check_reference, load_reference

    reference, fingerprint = load_reference(rounds.bema, log=_quiet)
    with torch.no_grad():
        weight = reference.get_parameter("model.norm.weight")
        weight[0] = torch.nextafter(weight[0], torch.tensor(2.0))  # one ulp
    with pytest.raises(DataError, match="differs from .*round1-bema's safetensors"):
        check_reference(reference, rounds.bema, fingerprint, when="in the test")


def test_output_dir_with_checkpoints_is_refused(rounds: Rounds) -> None:
    from bema_offline.errors import UsageError

    with pytest.raises(UsageError, match="already holds checkpoint folders; use a new folder for each round"):
        build_trainer(rounds.bema, rounds.prefs, rounds.root / "round1", config_overrides=FAST, log=_quiet, **ROUND)


def test_conversational_data_trains(rounds: Rounds) -> None:
    path = rounds.root / "chat.jsonl"
    make_preference_dataset(8, seed=2, conversational=True).to_json(path)
    result = train_dpo(
        rounds.bema, path, rounds.root / "round2-chat", config_overrides=FAST, log=_quiet,
        **(ROUND | {"max_steps": 2}),
    )  # fmt: skip
    assert result.record["dataset"] == {"path": str(path), "rows": 8, "format": "conversational"}
    assert result.checkpoints == [2]


# --- configuration (no training) ------------------------------------------------------------------------------


def test_config_overrides_are_typed_and_checked() -> None:
    from bema_offline.train.dpo import parse_config_overrides
    from bema_offline.errors import UsageError

    parsed = parse_config_overrides(
        ["warmup_steps=10", "weight_decay=0.01", "gradient_checkpointing=false", "max_length=none",
         "loss_type=sigmoid,sft", "loss_weights=[0.8, 0.2]", "lr_scheduler_type=cosine", "report_to=none",
         "model_init_kwargs={\"dtype\": \"bfloat16\"}", "max-grad-norm=0.5"]
    )  # fmt: skip
    assert parsed == {
        "warmup_steps": 10,
        "weight_decay": 0.01,
        "gradient_checkpointing": False,
        "max_length": None,
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [0.8, 0.2],
        "lr_scheduler_type": "cosine",
        "report_to": "none",
        "model_init_kwargs": {"dtype": "bfloat16"},
        "max_grad_norm": 0.5,
    }
    for pair, message in [
        ("warmup_step=10", "DPOConfig has no such field; did you mean warmup_steps?"),
        ("beta=0.2", "use --beta instead"),
        ("sync_ref_model=true", "not allowed, it would mix the policy into the reference"),
        ("save_strategy=epoch", "not allowed"),
        ("warmup_steps", "write KEY=VALUE"),
        ("seed=abc", "--config-set seed=abc: expected int"),
        ("gradient_checkpointing=maybe", "expected bool"),
        ("loss_weights=[0.8,", "expected list"),
        ("loss_weights=a,b", "expected list"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_config_overrides([pair])


def test_dpo_config_defaults_and_refusals(tmp_path: Path) -> None:
    from bema_offline.train.dpo import dpo_config
    from bema_offline.errors import UsageError

    config = dpo_config(tmp_path, save_steps=50, beta=0.2, overrides={"use_cpu": True})
    assert (config.save_strategy, config.save_steps, config.save_only_model, config.beta) == ("steps", 50, True, 0.2)
    assert config.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    with pytest.raises(UsageError, match="DPOConfig refused the settings: "):
        dpo_config(tmp_path, overrides={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]})
