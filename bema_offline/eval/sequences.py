"""Rows of evaluation data as token sequences, each with a mask of the tokens whose log-probability is scored.

The tokenization follows TRL's trainers, so that a loss here is the loss the run was trained on:

- `text`: the tokenizer's ids (with the special tokens it adds itself); every token after the first is scored.
- `chat` (`messages`): the chat template's ids; the assistant turns are scored, end-of-turn tokens included. A template
  with `{% generation %}` blocks gives the mask itself (`return_assistant_tokens_mask`, as TRL's SFT
  `assistant_only_loss`); otherwise each assistant turn is the part of the conversation rendered up to that turn
  that follows the conversation rendered before it with the generation prompt.
- `completion` (`prompt`, `completion`): TRL's SFT prompt-completion format: the EOS token is appended to a string
  completion, and the completion is what follows the longest common prefix of the prompt's ids and the whole's.
- `preference`: TRL's `DPOTrainer`: the same for `chosen` and `rejected`, the prompt extracted from conversations
  without one, and the completions starting where the prompt's ids and both wholes' ids part.

Sequences longer than `max_length` keep their start (TRL's default `truncation_mode`); rows with no scored token left
(a prompt that fills `max_length`, a one-token text) are dropped and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DataError
from .data import EvalData

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class ScoredSequence:
    """One sequence to run through a model.

    Args:
        input_ids (`list[int]`): the token ids.
        mask (`list[int]`): 1 where the token's log-probability given the tokens before it is scored; the first token
            is never scored.
    """

    input_ids: list[int]
    mask: list[int]

    @property
    def scored(self) -> int:
        return sum(self.mask)


@dataclass(frozen=True)
class PreparedData:
    """Evaluation data as token sequences.

    Args:
        kind (`str`): the data's kind (see `bema_offline.eval.data`).
        sequences (`list[ScoredSequence]`): one per row; for preference data the chosen sequence of every pair, then
            the rejected ones in the same order.
        rows (`int`): the rows kept.
        dropped (`int`): rows dropped because no scored token was left.
        truncated (`int`): sequences cut to `max_length`.
    """

    kind: str
    sequences: list[ScoredSequence]
    rows: int
    dropped: int
    truncated: int

    @property
    def scored_tokens(self) -> int:
        return sum(sequence.scored for sequence in self.sequences)


def prepare(data: EvalData, tokenizer, *, max_length: int | None = None) -> PreparedData:
    """Tokenize evaluation data into scored sequences.

    Args:
        data (`EvalData`): the rows and their kind.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer (with a chat template for conversations).
        max_length (`int`, *optional*): longest sequence; longer ones keep their start.

    Returns:
        `PreparedData`: the sequences, in the rows' order.

    Raises:
        `DataError`: a conversation the tokenizer has no chat template for, or no scored token left in any row.

    Example:

    ```python
    >>> prepared = prepare(load_eval_data("heldout.jsonl"), tokenizer, max_length=2048)
    >>> prepared.kind, prepared.rows, prepared.scored_tokens
    ('text', 200, 51234)
    ```
    """
    if data.conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"--data {data.path}: the rows are conversations but the tokenizer has no chat template; "
            "pass --tokenizer with a tokenizer that has one"
        )
    encode = _Encoder(tokenizer, data)
    pairs: list[tuple[ScoredSequence, ...]] = []
    dropped = truncated = 0
    for number, row in enumerate(data.rows, 1):
        if data.kind == "text":
            ids = encode.text(row["text"])
            sequences = (ScoredSequence(ids, [0] + [1] * (len(ids) - 1)),)
        elif data.kind == "chat":
            sequences = (encode.chat(row["messages"], number),)
        elif data.kind == "completion":
            sequences = (encode.completion(row["prompt"], row["completion"]),)
        else:
            sequences = encode.preference(row)
        if max_length is not None:
            truncated += sum(len(sequence.input_ids) > max_length for sequence in sequences)
            sequences = tuple(_keep_start(sequence, max_length) for sequence in sequences)
        if all(sequence.scored > 0 for sequence in sequences):
            pairs.append(sequences)
        else:
            dropped += 1
    if not pairs:
        limit = f" within --max-length {max_length}" if max_length is not None else ""
        raise DataError(f"--data {data.path}: no row has a token to score{limit} ({dropped} rows dropped)")
    sequences = [pair[i] for i in range(len(pairs[0])) for pair in pairs]
    return PreparedData(kind=data.kind, sequences=sequences, rows=len(pairs), dropped=dropped, truncated=truncated)


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading tokens two id lists share."""
    length = 0
    for token, other_token in zip(ids, other):
        if token != other_token:
            break
        length += 1
    return length


def _keep_start(sequence: ScoredSequence, max_length: int) -> ScoredSequence:
    if len(sequence.input_ids) <= max_length:
        return sequence
    return ScoredSequence(sequence.input_ids[:max_length], sequence.mask[:max_length])


def _completion(prompt_ids: list[int], whole_ids: list[int], start: int | None = None) -> ScoredSequence:
    start = common_prefix_length(prompt_ids, whole_ids) if start is None else start
    start = max(start, 1)  # the first token is never predicted
    return ScoredSequence(whole_ids, [0] * start + [1] * (len(whole_ids) - start))


class _Encoder:
    """The tokenizer calls of TRL's trainers, for one dataset."""

    def __init__(self, tokenizer, data: EvalData) -> None:
        self.tokenizer = tokenizer
        self.data = data
        self.eos = tokenizer.eos_token

    def text(self, text: str) -> list[int]:
        return list(self.tokenizer(text=text)["input_ids"])

    def template(self, messages: list[dict], **kwargs) -> list[int]:
        if not messages:
            return []
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    def ids(self, value: str | list, **kwargs) -> list[int]:
        return self.template(value, **kwargs) if isinstance(value, list) else self.text(value)

    def with_eos(self, text: str) -> str:
        return text if self.eos is None or text.endswith(self.eos) else text + self.eos

    def chat(self, messages: list[dict], number: int) -> ScoredSequence:
        if _GENERATION_BLOCK.search(self.tokenizer.chat_template or ""):
            encoded = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
            return ScoredSequence(ids, [0] + mask[1:])
        ids = self.template(messages)
        mask = [0] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            upto = self.template(messages[: index + 1])
            if common_prefix_length(upto, ids) != len(upto):
                raise DataError(
                    f"--data {self.data.path}: row {number}: the chat template renders the turns before assistant "
                    f"message {index + 1} differently once later turns follow, so its tokens cannot be found; use a "
                    "template with {% generation %} blocks (pass --tokenizer), or a shorter conversation"
                )
            before = self.template(messages[:index], add_generation_prompt=True)
            start = max(common_prefix_length(before, upto), 1)
            mask[start: len(upto)] = [1] * (len(upto) - start)
        return ScoredSequence(ids, mask)

    def completion(self, prompt: str | list, completion: str | list) -> ScoredSequence:
        if isinstance(prompt, list):
            prompt_ids = self.template(prompt, add_generation_prompt=True)
            return _completion(prompt_ids, self.template(prompt + completion))
        return _completion(self.text(prompt), self.text(prompt + self.with_eos(completion)))

    def preference(self, row: dict) -> tuple[ScoredSequence, ScoredSequence]:
        chosen, rejected = row["chosen"], row["rejected"]
        prompt = row.get("prompt")
        if prompt is None:  # conversations that hold their prompt (TRL's extract_prompt)
            shared = common_prefix_length(chosen, rejected)
            shared = min(shared, min(len(chosen), len(rejected)) - 1)
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if isinstance(chosen, list):
            prompt_ids = self.template(prompt, add_generation_prompt=True)
            chosen_ids, rejected_ids = self.template(prompt + chosen), self.template(prompt + rejected)
        else:
            prompt_ids = self.text(prompt)
            chosen_ids = self.text(prompt + self.with_eos(chosen))
            rejected_ids = self.text(prompt + self.with_eos(rejected))
        start = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
        return _completion(prompt_ids, chosen_ids, start), _completion(prompt_ids, rejected_ids, start)
