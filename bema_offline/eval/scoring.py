"""Log-probabilities of scored tokens under a causal LM, in padding-aware batches.

Sequences are sorted by length (longest first, ties in their original order) and cut into batches of `batch_size`,
right-padded, with an attention mask: the same batches for every model, so that every model sees exactly the same
computation and a rerun gives the same numbers. Each row's logits are upcast to float32 one row at a time (a bf16
model's logits are never turned into log-probabilities in bf16, and the float32 copy is one row's, not the batch's),
and the log-probabilities are summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sequences import ScoredSequence


@dataclass(frozen=True)
class SequenceScores:
    """Per sequence: the sum of its scored tokens' log-probabilities (float64) and how many there are."""

    logprob_sums: list[float]
    token_counts: list[int]


def batches(sequences: list[ScoredSequence], batch_size: int) -> list[list[int]]:
    """The indices of `sequences`, longest first (stable), cut into batches of at most `batch_size`."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    return [order[start: start + batch_size] for start in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_sequences(
    model: torch.nn.Module,
    sequences: list[ScoredSequence],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> SequenceScores:
    """Sum the log-probability of every scored token of every sequence.

    Args:
        model (`PreTrainedModel`): a causal LM in eval mode; its device is where the batches go.
        sequences (`list[ScoredSequence]`): the token ids and which tokens count.
        batch_size (`int`, defaults to 8): sequences per forward pass.
        pad_token_id (`int`, defaults to 0): the id padding is filled with (it is masked out; any id works).
        on_batch (`Callable[[int], None]`, *optional*): called with the number of sequences after each batch.

    Returns:
        `SequenceScores`: one sum and one count per sequence, in the order of `sequences`. A sum is NaN or -inf
        when the model's logits are not finite there.

    Example:

    ```python
    >>> scores = score_sequences(model, prepare(data, tokenizer).sequences, batch_size=8)
    >>> loss = -sum(scores.logprob_sums) / sum(scores.token_counts)
    ```
    """
    device = next(model.parameters()).device
    sums = [0.0] * len(sequences)
    counts = [0] * len(sequences)
    for batch in batches(sequences, batch_size):
        length = len(sequences[batch[0]].input_ids)
        input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = sequences[index].input_ids
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).logits
        for row, index in enumerate(batch):
            sequence = sequences[index]
            size = len(sequence.input_ids)
            targets = input_ids[row, 1:size].to(device)
            logprobs = -F.cross_entropy(logits[row, : size - 1].float(), targets, reduction="none")
            scored = torch.tensor(sequence.mask[1:], dtype=torch.bool, device=device)
            sums[index] = logprobs[scored].double().sum().item()
            counts[index] = int(scored.sum())
        del logits
        if on_batch is not None:
            on_batch(len(batch))
    return SequenceScores(logprob_sums=sums, token_counts=counts)
