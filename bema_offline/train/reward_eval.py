"""Held-out DPO reward accuracy and margin: how far a model has moved from a fixed yardstick on preference pairs.

For a held-out pair (x, y_w, y_l), the implicit DPO reward of a model π against a yardstick π₀ (the base model of
an iterative run) is

    r(x, y) = β · (log π(y | x) − log π₀(y | x)),   log π(y | x) = Σ log-probabilities of y's tokens

The reward accuracy is the fraction of pairs with r(x, y_w) > r(x, y_l) (ties count as wrong, as in TRL's
`rewards/accuracies`, so the yardstick itself scores 0), and the margin is the mean of r(x, y_w) − r(x, y_l)
(TRL's `rewards/margins`). Both are computed over all pairs at once, not as a mean of batch means. Sequences are
built as TRL's `DPOTrainer` builds them: plain-text completions end with EOS, conversations go through the chat
template, the completion starts where the tokenized prompt and prompt + completion part, and `max_length`
truncates the end (pairs whose prompt alone fills it are left out, as TRL drops them).

This is the per-round metric of `bema-offline iterate --eval-data`; `PreferenceRewardEval.score` has the shape
of a general per-model scorer (a model folder in, named numbers out), so that other metrics can take its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..output.fingerprint import folder_fingerprint
from .preferences import load_preference_dataset

METRICS = ("reward_accuracy", "reward_margin")


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids: the shared prompt, then each completion."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def tokenize_pairs(rows: Sequence[dict], tokenizer, *, max_length: int | None = None) -> list[TokenizedPair]:
    """Token ids of preference rows, built as TRL's DPOTrainer builds its training sequences.

    Args:
        rows (`Sequence[dict]`): `prompt`/`chosen`/`rejected` rows, strings or `{role, content}` messages (an
            implicit prompt is extracted as TRL does).
        tokenizer (`PreTrainedTokenizerBase`): the models' tokenizer.
        max_length (`int`, *optional*): pairs whose prompt alone has `max_length` tokens or more are left out.

    Returns:
        `list[TokenizedPair]`
    """
    from trl.data_utils import is_conversational, maybe_extract_prompt

    pairs = []
    for row in rows:
        row = maybe_extract_prompt(dict(row))
        if is_conversational(row):
            prompt = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)
            with_chosen = _chat_ids(tokenizer, row["prompt"] + row["chosen"])
            with_rejected = _chat_ids(tokenizer, row["prompt"] + row["rejected"])
        else:
            eos = tokenizer.eos_token or ""
            chosen, rejected = (text if text.endswith(eos) else text + eos for text in (row["chosen"], row["rejected"]))
            prompt = tokenizer(text=row["prompt"])["input_ids"]
            with_chosen = tokenizer(text=row["prompt"] + chosen)["input_ids"]
            with_rejected = tokenizer(text=row["prompt"] + rejected)["input_ids"]
        shared = min(_common_prefix(prompt, with_chosen), _common_prefix(prompt, with_rejected))
        if max_length is not None and shared >= max_length:
            continue
        pairs.append(TokenizedPair(list(prompt[:shared]), list(with_chosen[shared:]), list(with_rejected[shared:])))
    return pairs


def _chat_ids(tokenizer, messages: list, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def _common_prefix(ids: Sequence[int], other: Sequence[int]) -> int:
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length


@torch.no_grad()
def completion_logps(
    model, pairs: Sequence[TokenizedPair], *, max_length: int | None = None, pad_token_id: int = 0, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each pair's chosen and rejected completion under `model`, in float64.

    Sequences longer than `max_length` lose their end (TRL's `keep_start`). Returns `(chosen, rejected)`, each of
    shape `(len(pairs),)`.
    """
    sequences, masks = [], []
    for completion in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            ids = pair.prompt_ids + getattr(pair, completion)
            mask = [0] * len(pair.prompt_ids) + [1] * len(getattr(pair, completion))
            sequences.append(ids[:max_length] if max_length is not None else ids)
            masks.append(mask[:max_length] if max_length is not None else mask)
    device = next(model.parameters()).device
    sums = []
    for start in range(0, len(sequences), batch_size):
        batch, batch_masks = sequences[start : start + batch_size], masks[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        completion = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (ids, mask) in enumerate(zip(batch, batch_masks)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            completion[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = input_ids[:, 1:].to(device)
        token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
        sums.append((token_logps * completion[:, 1:].to(device)).sum(dim=1).cpu())
    totals = torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)
    return totals[: len(pairs)], totals[len(pairs) :]


class PreferenceRewardEval:
    """Scores model folders by held-out DPO reward accuracy and margin against a fixed yardstick model.

    The yardstick's log-probabilities are computed once; each `score` loads one model folder, computes its own,
    and releases it.

    Args:
        eval_data (`str | Path`): held-out preference data (see `load_preference_dataset`).
        yardstick (`str | Path`): the model folder rewards are measured against, e.g. the run's base model. Its
            tokenizer tokenizes the data.
        beta (`float`): the DPO β of the rewards.
        max_length (`int`, *optional*): TRL's `max_length` of the run.

    Example:

    ```python
    >>> scorer = PreferenceRewardEval("heldout.jsonl", "runs/base", beta=0.1)
    >>> scorer.score("runs/iter/round-1-bema")
    {'reward_accuracy': 0.625, 'reward_margin': 0.0412}
    ```
    """

    def __init__(self, eval_data: str | Path, yardstick: str | Path, *, beta: float, max_length: int | None = None) -> None:
        from transformers import AutoTokenizer

        self.eval_data, self.yardstick, self.beta, self.max_length = Path(eval_data), Path(yardstick), beta, max_length
        dataset, _ = load_preference_dataset(self.eval_data)
        tokenizer = AutoTokenizer.from_pretrained(self.yardstick)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.pairs = tokenize_pairs(list(dataset), tokenizer, max_length=max_length)
        if not self.pairs:
            raise DataError(f"--eval-data {self.eval_data}: every pair's prompt has max_length ({max_length}) tokens or more; nothing to score")
        self.yardstick_logps = self._logps(self.yardstick)
        self._scores: dict[str, dict[str, float]] = {}  # by the model folder's fingerprint
        self.description = (
            f"held-out DPO reward against {self.yardstick} (β = {beta}, {len(self.pairs)} pairs of {self.eval_data.name})"
        )

    def _logps(self, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        try:
            return completion_logps(model, self.pairs, max_length=self.max_length, pad_token_id=self.pad_token_id)
        finally:
            del model

    def score(self, model_dir: str | Path, *, fingerprint: str | None = None) -> dict[str, float]:
        """The reward accuracy and margin of a model folder (cached by its weights' fingerprint)."""
        fingerprint = fingerprint or folder_fingerprint(model_dir)
        if fingerprint not in self._scores:
            chosen, rejected = self._logps(Path(model_dir))
            self._scores[fingerprint] = reward_metrics(chosen, rejected, *self.yardstick_logps, beta=self.beta)
        return dict(self._scores[fingerprint])


def reward_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, yardstick_chosen: torch.Tensor, yardstick_rejected: torch.Tensor, *, beta: float
) -> dict[str, float]:
    """Reward accuracy and margin from summed completion log-probabilities (see the module's docstring)."""
    if len(chosen) == 0:
        return {"reward_accuracy": float("nan"), "reward_margin": float("nan")}
    chosen_rewards = beta * (chosen - yardstick_chosen)
    rejected_rewards = beta * (rejected - yardstick_rejected)
    return {
        "reward_accuracy": (chosen_rewards > rejected_rewards).double().mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
    }
