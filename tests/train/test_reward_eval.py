"""`bema_offline.train.reward_eval`: held-out DPO reward accuracy and margin, checked against TRL's own
`DPOTrainer.evaluate()` (its `rewards/accuracies` and `rewards/margins`, computed in one batch so that TRL's mean of
batch means is the mean over all pairs), and against a float64 sum written out here."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from tiny_dpo import make_preference_dataset, make_tiny_llama, make_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from bema_offline.errors import DataError
from bema_offline.train.reward_eval import PreferenceRewardEval, tokenize_pairs

BETA = 0.3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reward_eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "datasets_cache"))
        tokenizer = make_tokenizer(root / "tokenizer")
        make_tiny_llama(root / "base", tokenizer, seed=0)
        make_tiny_llama(root / "policy", tokenizer, seed=1)
        make_preference_dataset(10, seed=5).to_json(root / "plain.jsonl")
        make_preference_dataset(10, seed=6, conversational=True).to_json(root / "chat.jsonl")
        yield root
    torch.set_num_threads(threads)


def trl_metrics(root: Path, data: Path, max_length: int) -> dict[str, float]:
    from trl import DPOConfig, DPOTrainer

    from bema_offline.train.preferences import load_preference_dataset

    dataset, _ = load_preference_dataset(data)
    config = DPOConfig(
        output_dir=str(root / "trl"), beta=BETA, max_length=max_length, per_device_eval_batch_size=len(dataset),
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=str(root / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(root / "base"),
        args=config,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=PreTrainedTokenizerFast.from_pretrained(root / "tokenizer"),
    )
    metrics = trainer.evaluate()
    return {"reward_accuracy": metrics["eval_rewards/accuracies"], "reward_margin": metrics["eval_rewards/margins"]}


@pytest.mark.parametrize(("data", "max_length"), [("plain.jsonl", 1024), ("plain.jsonl", 6), ("chat.jsonl", 16)])
def test_scores_equal_trls_own_evaluation(models: Path, data: str, max_length: int) -> None:
    scorer = PreferenceRewardEval(models / data, models / "base", beta=BETA, max_length=max_length)
    ours = scorer.score(models / "policy")
    theirs = trl_metrics(models, models / data, max_length)
    assert ours["reward_accuracy"] == pytest.approx(theirs["reward_accuracy"], abs=1e-6)
    assert ours["reward_margin"] == pytest.approx(theirs["reward_margin"], rel=1e-3, abs=1e-6)  # TRL sums float32 log-probs
    assert 0 < ours["reward_accuracy"] < 1 and ours["reward_margin"] != 0
    assert scorer.score(models / "base") == {"reward_accuracy": 0.0, "reward_margin": 0.0}  # the yardstick itself


def test_margin_is_the_float64_sum_of_completion_log_probs(models: Path) -> None:
    """An independent computation: log-softmax of each sequence alone (no padding), in float64."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(models / "tokenizer")
    rows = list(datasets.Dataset.from_json(str(models / "plain.jsonl")))
    pairs = tokenize_pairs(rows, tokenizer)
    assert pairs[0].chosen_ids[-1] == tokenizer.eos_token_id  # plain-text completions end with EOS, as in TRL

    def logp(model, prompt: list[int], completion: list[int]) -> float:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
        return logps[len(prompt) - 1 :].sum().item()

    policy, base = (AutoModelForCausalLM.from_pretrained(models / name).eval() for name in ("policy", "base"))
    margins = [
        BETA * ((logp(policy, p.prompt_ids, p.chosen_ids) - logp(base, p.prompt_ids, p.chosen_ids))
                - (logp(policy, p.prompt_ids, p.rejected_ids) - logp(base, p.prompt_ids, p.rejected_ids)))
        for p in pairs
    ]  # fmt: skip
    scores = PreferenceRewardEval(models / "plain.jsonl", models / "base", beta=BETA).score(models / "policy")
    assert scores["reward_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-5)
    assert scores["reward_accuracy"] == sum(m > 0 for m in margins) / len(margins)


def test_nothing_left_to_score_is_one_line(models: Path) -> None:
    with pytest.raises(DataError, match=r"plain.jsonl: every pair's prompt has max_length \(2\) tokens or more"):
        PreferenceRewardEval(models / "plain.jsonl", models / "base", beta=BETA, max_length=2)
