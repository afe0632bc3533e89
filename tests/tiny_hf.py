"""Tiny, fully local Hugging Face fixtures: tokenizer, Qwen2 model, preference data, TRL DPO run.

Everything here is built from scratch on the fly (no network, no Hub downloads) and is small enough
that a real TRL DPO training run with BEMA takes a few seconds on a laptop CPU.

TRL pitfalls worth knowing (checked against TRL 1.16 / transformers 5.x):

- ``BEMACallback._update_bema_weights`` zips ``running_model.parameters()`` with the *trainable*
  parameters (``strict=True``). Freezing any parameter makes the zip fail (or, on older TRL without
  ``strict``, silently misalign names). Keep every parameter trainable in fixtures.
- The running model is ``type(model)(model.config)``: it is built in torch's default dtype (fp32),
  whatever the training dtype; the BEMA arithmetic itself happens in the parameters' dtype and is
  only then copied into the fp32 running model. With fp32 training everything is fp32.
- ``save_pretrained`` drops ``lm_head.weight`` when embeddings are tied, both in ``checkpoint-N``
  and in ``bema/``.
- When ``update_after == 0`` there is no ``checkpoint-0``: θ0 is the policy at ``on_train_begin``,
  i.e. the base model folder.
- ``DPOConfig`` defaults to ``bf16=True`` and ``gradient_checkpointing=True``; both are turned off.
- When the policy is passed as an instance, DPOTrainer loads the reference model again from
  ``model.config._name_or_path``, so the base model must be loaded from a folder.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS: list[str] = ["<pad>", "<unk>", "<bos>", "<eos>"]

ROLE_WORDS: list[str] = ["system", "user", "assistant"]

# Plain lower-case words only: the pre-tokenizer splits on whitespace, so every word is one token.
CONTENT_WORDS: list[str] = """
the a an and or but if then so because of to in on at by for with from about over under
i you he she it we they me him her us them my your his its our their this that these those
is are was were be been being have has had do does did will would can could should may might
cat dog bird fish horse cow sheep mouse lion tiger bear wolf fox rabbit duck goat
red blue green yellow black white orange purple brown gray pink
one two three four five six seven eight nine ten
big small fast slow hot cold good bad happy sad new old young long short
run walk eat drink sleep see hear think know want like love give take make go come
house tree river sea sky sun moon star road city town field garden door window book
yes no not very much many more most some any all every each
""".split()

CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "<bos>{{ message['role'] }} {{ message['content'] }} <eos> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant {% endif %}"
)


def vocabulary() -> list[str]:
    """Return the full, ordered vocabulary (special tokens first, then role and content words)."""
    seen: dict[str, None] = {}
    for word in [*SPECIAL_TOKENS, *ROLE_WORDS, *CONTENT_WORDS]:
        seen.setdefault(word, None)
    return list(seen)


def make_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Build a tiny word-level tokenizer with a chat template, save it to ``path`` and return it."""
    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=128,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return tokenizer


def make_tiny_qwen2(
    path: Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Qwen2ForCausalLM:
    """Create a randomly initialised 2-layer Qwen2 (θ0), save it with the tokenizer to ``path``."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return model


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(CONTENT_WORDS) for _ in range(rng.randint(lo, hi)))


def make_preference_dataset(n: int, *, seed: int = 0, conversational: bool = False) -> Dataset:
    """Synthetic preference data (``prompt``/``chosen``/``rejected``) using only in-vocabulary words.

    Standard format has string columns; ``conversational=True`` gives lists of ``{"role", "content"}``
    messages (prompt: a user turn, chosen/rejected: one assistant turn), as TRL expects.
    """
    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        prompt = _sentence(rng, 3, 6)
        chosen = _sentence(rng, 2, 5)
        rejected = _sentence(rng, 2, 5)
        while rejected == chosen:
            rejected = _sentence(rng, 2, 5)
        if conversational:
            rows["prompt"].append([{"role": "user", "content": prompt}])
            rows["chosen"].append([{"role": "assistant", "content": chosen}])
            rows["rejected"].append([{"role": "assistant", "content": rejected}])
        else:
            # Leading space so that prompt + completion tokenizes as prompt tokens + completion tokens.
            rows["prompt"].append(prompt)
            rows["chosen"].append(" " + chosen)
            rows["rejected"].append(" " + rejected)
    return Dataset.from_dict(rows)


def train_dpo_with_bema(
    base_dir: Path,
    output_dir: Path,
    *,
    max_steps: int,
    save_steps: int,
    bema_kwargs: dict[str, Any],
    seed: int = 0,
    conversational: bool = False,
    learning_rate: float = 1e-3,
) -> Path:
    """Run TRL's experimental DPOTrainer with ``BEMACallback(**bema_kwargs)`` in fp32 on CPU.

    The policy is loaded from ``base_dir`` (θ0). Writes ``output_dir/checkpoint-N/model.safetensors``
    every ``save_steps`` steps and TRL's ``output_dir/bema/`` at the end. Returns ``output_dir``.
    """
    # Imported lazily so that modules importing the other fixtures do not pay for TRL.
    from trl import DPOConfig
    from trl.experimental.bema_for_ref_model import BEMACallback, DPOTrainer

    base_dir = Path(base_dir)
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    model = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dataset = make_preference_dataset(2 * max_steps, seed=seed, conversational=conversational)
    args = DPOConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        save_strategy="steps",
        save_steps=save_steps,
        save_only_model=True,
        logging_steps=max_steps,
        report_to=[],
        max_length=32,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        disable_tqdm=True,
        model_init_kwargs=None,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[BEMACallback(**bema_kwargs)],
    )
    # One intra-op thread: the model is tiny, so threads only add sync overhead, which becomes
    # seconds per step when another process competes for the cores. It also keeps the run
    # deterministic. Restored afterwards so other tests are unaffected.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return output_dir
