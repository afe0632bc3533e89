"""Tokenization of each data kind: which tokens are scored, against transformers' own assistant mask and by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_hf import CHAT_TEMPLATE, make_tokenizer

from bema_offline.errors import DataError
from bema_offline.eval.data import EvalData
from bema_offline.eval.sequences import prepare

# the same rendering as tiny_hf's template, with the assistant turns in {% generation %} blocks
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "<bos>{{ message['role'] }} "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} <eos>{% endgeneration %}"
    "{% else %}{{ message['content'] }} <eos>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant {% endif %}"
)
CHATS = [
    [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "is red"}],
    [
        {"role": "system", "content": "be good"},
        {"role": "user", "content": "the dog"},
        {"role": "assistant", "content": "is very big"},
        {"role": "user", "content": "and the cow"},
        {"role": "assistant", "content": "is small"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _data(kind: str, rows: list[dict], conversational: bool = False) -> EvalData:
    return EvalData(path=Path("data.jsonl"), kind=kind, conversational=conversational, rows=rows)


def _scored_words(tokenizer, sequence) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i, m in zip(sequence.input_ids, sequence.mask) if m]


def test_text_scores_every_token_after_the_first(tokenizer) -> None:
    prepared = prepare(_data("text", [{"text": "the cat is red"}]), tokenizer)
    (sequence,) = prepared.sequences
    assert sequence.input_ids == tokenizer("the cat is red")["input_ids"]
    assert sequence.mask == [0, 1, 1, 1] and prepared.scored_tokens == 3


def test_chat_masks_equal_transformers_assistant_masks(tokenizer) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE  # no {% generation %}: the mask is found turn by turn
    by_turns = prepare(_data("chat", [{"messages": m} for m in CHATS], True), tokenizer).sequences
    tokenizer.chat_template = GENERATION_TEMPLATE  # transformers' return_assistant_tokens_mask
    by_template = prepare(_data("chat", [{"messages": m} for m in CHATS], True), tokenizer).sequences
    tokenizer.chat_template = CHAT_TEMPLATE
    assert [s.input_ids for s in by_turns] == [s.input_ids for s in by_template]
    assert [s.mask for s in by_turns] == [s.mask for s in by_template]
    assert _scored_words(tokenizer, by_turns[1]) == ["is", "very", "big", "<eos>", "is", "small", "<eos>"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer) -> None:
    tokenizer.chat_template = "{% if messages | length > 2 %}long {% endif %}" + CHAT_TEMPLATE  # Qwen3-like
    try:
        with pytest.raises(DataError, match="row 1: the chat template renders the turns before assistant message 2"):
            prepare(_data("chat", [{"messages": CHATS[0] + CHATS[0]}], True), tokenizer)
    finally:
        tokenizer.chat_template = CHAT_TEMPLATE


def test_completion_appends_eos_to_text_and_scores_the_completion(tokenizer) -> None:
    rows = [{"prompt": "the cat", "completion": " is red"}, {"prompt": "the dog", "completion": " is blue<eos>"}]
    first, second = prepare(_data("completion", rows), tokenizer).sequences
    assert _scored_words(tokenizer, first) == ["is", "red", "<eos>"]
    assert _scored_words(tokenizer, second) == ["is", "blue", "<eos>"]  # not a second <eos>
    chat = [{"prompt": [{"role": "user", "content": "the cat"}], "completion": [{"role": "assistant", "content": "is red"}]}]
    (sequence,) = prepare(_data("completion", chat, True), tokenizer).sequences
    assert _scored_words(tokenizer, sequence) == ["is", "red", "<eos>"]


def test_preference_pairs_and_the_implicit_prompt(tokenizer) -> None:
    explicit = {"prompt": [{"role": "user", "content": "the cat"}], "chosen": [{"role": "assistant", "content": "is red"}],
                "rejected": [{"role": "assistant", "content": "is not blue"}]}
    implicit = {"chosen": explicit["prompt"] + explicit["chosen"], "rejected": explicit["prompt"] + explicit["rejected"]}
    with_prompt = prepare(_data("preference", [explicit, explicit], True), tokenizer)
    without = prepare(_data("preference", [implicit, implicit], True), tokenizer)
    assert with_prompt.sequences == without.sequences
    chosen, _, rejected, _ = with_prompt.sequences  # every chosen first, then every rejected
    assert _scored_words(tokenizer, chosen) == ["is", "red", "<eos>"]
    assert _scored_words(tokenizer, rejected) == ["is", "not", "blue", "<eos>"]
    (chosen, rejected) = prepare(_data("preference", [{"prompt": "the cat", "chosen": " is red", "rejected": " is"}]),
                                 tokenizer).sequences
    assert _scored_words(tokenizer, chosen) == ["is", "red", "<eos>"] and _scored_words(tokenizer, rejected) == ["is", "<eos>"]


def test_max_length_keeps_the_start_and_drops_rows_left_with_nothing_to_score(tokenizer) -> None:
    rows = [{"prompt": "the cat is very big", "completion": " and red"}, {"prompt": "a", "completion": " dog is red"}]
    prepared = prepare(_data("completion", rows), tokenizer, max_length=4)
    assert prepared.rows == 1 and prepared.dropped == 1 and prepared.truncated == 2
    assert _scored_words(tokenizer, prepared.sequences[0]) == ["dog", "is", "red"]
    with pytest.raises(DataError, match="no row has a token to score within --max-length 2"):
        prepare(_data("completion", rows[:1]), tokenizer, max_length=2)


def test_conversations_need_a_chat_template(tokenizer, tmp_path: Path) -> None:
    plain = make_tokenizer(tmp_path / "plain")
    plain.chat_template = None
    with pytest.raises(DataError, match="the rows are conversations but the tokenizer has no chat template"):
        prepare(_data("chat", [{"messages": CHATS[0]}], True), plain)
