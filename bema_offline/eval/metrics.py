"""The metrics of `bema-offline eval`, from per-sequence log-probability sums, in float64.

Loss metrics (text, chat, completion data): the mean negative log-likelihood per scored token over the whole data
(the sum over every scored token, divided by their number, not a mean of per-row means), and its exponential.

Preference metrics follow TRL's `DPOTrainer` (`loss_type="sigmoid"`): with log-ratios `r = log π(y|x) − log π_ref(y|x)`
summed over the completion's tokens, the implicit rewards are `β·r`, and

- `reward_accuracy`: the share of pairs whose chosen reward is strictly above the rejected one (`rewards/accuracies`);
- `reward_margin`: the mean of chosen reward minus rejected reward (`rewards/margins`);
- `dpo_loss`: the mean of `−log σ(β·(r_chosen − r_rejected))`;
- `chosen_loss`: the mean negative log-likelihood per token of the chosen completions.

A non-finite log-probability makes every metric that depends on it NaN; it is never compared away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .scoring import SequenceScores


@dataclass(frozen=True)
class Metric:
    """A metric's name, its direction and what it is."""

    name: str
    higher_is_better: bool
    description: str


METRICS = {
    metric.name: metric
    for metric in (
        Metric("loss", False, "mean negative log-likelihood per scored token (nats)"),
        Metric("perplexity", False, "exp(loss)"),
        Metric("reward_accuracy", True, "share of pairs whose implicit reward ranks chosen above rejected"),
        Metric("reward_margin", True, "mean implicit reward of chosen minus rejected"),
        Metric("dpo_loss", False, "mean DPO (sigmoid) loss"),
        Metric("chosen_loss", False, "mean negative log-likelihood per token of the chosen completions (nats)"),
        Metric("reward_chosen", True, "mean implicit reward of the chosen completions"),
        Metric("reward_rejected", False, "mean implicit reward of the rejected completions"),
    )
}
DEFAULT_METRIC = {"text": "loss", "chat": "loss", "completion": "loss", "preference": "reward_accuracy"}
METRICS_OF_KIND = {
    "text": ("loss", "perplexity"),
    "chat": ("loss", "perplexity"),
    "completion": ("loss", "perplexity"),
    "preference": ("reward_accuracy", "reward_margin", "dpo_loss", "chosen_loss", "reward_chosen", "reward_rejected"),
}
# When the ranking metric ties (accuracy on a few hundred pairs often does), the next one decides; the tie is reported.
TIE_BREAK = {"reward_accuracy": "reward_margin"}


def loss_metrics(scores: SequenceScores) -> dict[str, float]:
    """Loss and perplexity over every scored token.

    Example:

    ```python
    >>> loss_metrics(SequenceScores(logprob_sums=[-2.0, -4.0], token_counts=[1, 3]))
    {'loss': 1.5, 'perplexity': 4.4816890703380645}
    ```
    """
    loss = -math.fsum(scores.logprob_sums) / sum(scores.token_counts)
    return {"loss": loss, "perplexity": _exp(loss)}


def preference_metrics(policy: SequenceScores, reference: SequenceScores, *, beta: float) -> dict[str, float]:
    """DPO's implicit reward metrics of a policy against a reference, on the same pairs.

    Args:
        policy (`SequenceScores`): the model's sums, chosen sequences first, then the rejected ones in the same order.
        reference (`SequenceScores`): the reference model's, in the same order.
        beta (`float`): DPO's β.

    Returns:
        `dict[str, float]`: `reward_accuracy`, `reward_margin`, `dpo_loss`, `chosen_loss`, `reward_chosen` and
        `reward_rejected`.
    """
    pairs = len(policy.logprob_sums) // 2
    logratios = [p - r for p, r in zip(policy.logprob_sums, reference.logprob_sums)]
    chosen_rewards = [beta * x for x in logratios[:pairs]]
    rejected_rewards = [beta * x for x in logratios[pairs:]]
    finite = all(math.isfinite(x) for x in logratios)
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards)]
    chosen_tokens = sum(policy.token_counts[:pairs])
    return {
        "reward_accuracy": sum(c > r for c, r in zip(chosen_rewards, rejected_rewards)) / pairs if finite else math.nan,
        "reward_margin": math.fsum(margins) / pairs if finite else math.nan,
        "dpo_loss": math.fsum(_softplus(-m) for m in margins) / pairs if finite else math.nan,
        "chosen_loss": -math.fsum(policy.logprob_sums[:pairs]) / chosen_tokens,
        "reward_chosen": math.fsum(chosen_rewards) / pairs if finite else math.nan,
        "reward_rejected": math.fsum(rejected_rewards) / pairs if finite else math.nan,
    }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _softplus(x: float) -> float:
    """log(1 + e^x), without overflow: −log σ(m) is softplus(−m)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
