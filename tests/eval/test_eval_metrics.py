"""Preference metrics against TRL's own DPOTrainer on the same pairs and reference; the metric formulas by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from bema_offline.eval import evaluate
from bema_offline.eval.metrics import loss_metrics, preference_metrics
from bema_offline.eval.scoring import SequenceScores


def _trl_eval_metrics(policy_dir: Path, ref_dir: Path, data_path: Path, output_dir: Path, *, beta: float) -> dict:
    """TRL's DPOTrainer.evaluate on the whole data as one batch, fp32, no bf16, no gradient checkpointing."""
    from trl import DPOConfig, DPOTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(policy_dir)
    data = Dataset.from_json(str(data_path))
    args = DPOConfig(
        output_dir=str(output_dir), beta=beta, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        per_device_eval_batch_size=len(data), report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
        ref_model=LlamaForCausalLM.from_pretrained(ref_dir, dtype=torch.float32),
        args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer,
    )
    return trainer.evaluate()


@pytest.mark.parametrize("data_format", ["standard", "conversational"])
def test_reward_accuracy_and_margin_equal_trls_dpo(grid, tmp_path: Path, data_format: str) -> None:
    data = grid.prefs if data_format == "standard" else grid.chat_prefs
    policy = grid.run_dir / "checkpoint-12"
    ours = evaluate([policy], data, ref_model=grid.base_dir, beta=0.2, batch_size=5).ranked[0].metrics
    trl = _trl_eval_metrics(policy, grid.base_dir, data, tmp_path / "trl", beta=0.2)
    assert 0.0 < ours["reward_accuracy"] < 1.0  # a real mix of right and wrong pairs, not a degenerate case
    pairs = len(data.read_text().splitlines())
    assert ours["reward_accuracy"] * pairs == round(trl["eval_rewards/accuracies"] * pairs)  # TRL averages in float32
    assert ours["reward_margin"] == pytest.approx(trl["eval_rewards/margins"], rel=1e-4, abs=1e-6)
    assert ours["reward_chosen"] == pytest.approx(trl["eval_rewards/chosen"], rel=1e-4, abs=1e-6)
    assert ours["reward_rejected"] == pytest.approx(trl["eval_rewards/rejected"], rel=1e-4, abs=1e-6)
    assert ours["dpo_loss"] == pytest.approx(trl["eval_loss"], rel=1e-4)


def test_loss_is_over_every_token_not_a_mean_of_row_means() -> None:
    metrics = loss_metrics(SequenceScores(logprob_sums=[-2.0, -4.0], token_counts=[1, 3]))
    assert metrics == {"loss": 1.5, "perplexity": math.exp(1.5)}


def test_preference_metrics_by_hand() -> None:
    # two pairs, chosen first: log-ratios chosen (+1, -1), rejected (-2, +0.5)
    policy = SequenceScores(logprob_sums=[-9.0, -11.0, -12.0, -9.5], token_counts=[3, 2, 4, 1])
    reference = SequenceScores(logprob_sums=[-10.0, -10.0, -10.0, -10.0], token_counts=[3, 2, 4, 1])
    metrics = preference_metrics(policy, reference, beta=0.5)
    margins = [0.5 * (1 - -2), 0.5 * (-1 - 0.5)]
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / 2)
    assert metrics["dpo_loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 2)
    assert metrics["chosen_loss"] == pytest.approx(20.0 / 5)
    assert metrics["reward_chosen"] == pytest.approx(0.5 * (1 + -1) / 2)


def test_a_non_finite_log_probability_makes_the_metrics_nan_not_zero() -> None:
    policy = SequenceScores(logprob_sums=[math.nan, -1.0, -2.0, -2.0], token_counts=[1, 1, 1, 1])
    reference = SequenceScores(logprob_sums=[-1.0, -1.0, -1.0, -1.0], token_counts=[1, 1, 1, 1])
    metrics = preference_metrics(policy, reference, beta=0.1)
    assert all(math.isnan(metrics[name]) for name in ("reward_accuracy", "reward_margin", "dpo_loss", "chosen_loss"))
    assert math.isnan(loss_metrics(policy)["loss"])
