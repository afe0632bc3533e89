"""A tiny Llama for DPO tests whose tokenizer survives `AutoTokenizer` (the path users take).

`tiny_hf.make_tiny_qwen2` is fine when the tokenizer object is handed over, but `AutoTokenizer` on a `qwen2`
folder forces `Qwen2Tokenizer` (transformers 5 lists qwen2 among models whose Hub tokenizer class is "incorrect"),
which drops the word-level vocabulary: prompts tokenize to nothing. For `llama` the saved `TokenizersBackend`
is respected, so the tokenizer loads back as saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tiny_hf import make_preference_dataset, make_tokenizer

__all__ = ["make_preference_dataset", "make_tiny_llama", "make_tokenizer"]


def make_tiny_llama(path: Path, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama with tied embeddings, saved with the tokenizer to `path`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
