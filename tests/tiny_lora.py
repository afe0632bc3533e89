"""Real LoRA runs for the PEFT tests: TRL's DPOTrainer and SFTTrainer with a `peft.LoraConfig` on tiny models.

Each run trains 6 steps in fp32 on CPU and saves `checkpoint-2`, `-4` and `-6` (about a second each). The runs are
built once per test session (`lora_run`), whichever test file asks first, and shared read-only.

| run | trainer | base | adapter |
|---|---|---|---|
| `dpo` | DPO | Qwen2, tied embeddings | all-linear, r=4, alpha=12 (s=3) |
| `sft` | SFT | Qwen2, tied embeddings | rslora, rank_pattern, alpha_pattern, modules_to_save=[lm_head], bias=lora_only |
| `dora` | SFT | Qwen2, tied embeddings | DoRA on q/v/o/up, every bias trained (bias=all) |
| `lora_bias` | DPO | Qwen2, tied embeddings | lora_bias on q/k/v (a bias on B, merged into the base bias) |
| `gpt2` | SFT | GPT-2 (Conv1D, fan_in_fan_out), untied | c_attn, c_proj, c_fc and the wte embedding |
| `gpt2_dora` | SFT | GPT-2, untied | DoRA on c_attn and the wte embedding |
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tiny_hf import make_preference_dataset, make_tiny_qwen2, make_tokenizer

STEPS = (2, 4, 6)
LORA_RUNS = {
    "dpo": dict(trainer="dpo", base="qwen2", lora=dict(r=4, lora_alpha=12, target_modules="all-linear")),
    "sft": dict(
        trainer="sft",
        base="qwen2",
        lora=dict(
            r=4,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
            rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.o_proj": 6},
            alpha_pattern={"up_proj": 5},
            modules_to_save=["lm_head"],
            bias="lora_only",
        ),
    ),
    "dora": dict(trainer="sft", base="qwen2", lora=dict(r=4, lora_alpha=7, use_dora=True, bias="all", target_modules=["q_proj", "v_proj", "o_proj", "up_proj"])),
    "lora_bias": dict(trainer="dpo", base="qwen2", lora=dict(r=3, lora_alpha=5, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj"])),
    "gpt2": dict(trainer="sft", base="gpt2", lora=dict(r=4, lora_alpha=10, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc", "wte"])),
    "gpt2_dora": dict(trainer="sft", base="gpt2", lora=dict(r=2, lora_alpha=5, fan_in_fan_out=True, use_dora=True, target_modules=["c_attn", "wte"])),
}


@dataclass(frozen=True)
class LoraRun:
    """A trained LoRA run: `run_dir/checkpoint-{2,4,6}` and the base model folder it was trained from."""

    name: str
    run_dir: Path
    base_dir: Path
    model_class: type

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / f"checkpoint-{step}"

    def load_base(self):
        """A fresh copy of the base model (fp32)."""
        return self.model_class.from_pretrained(self.base_dir, dtype=torch.float32)


_BUILT: dict[str, LoraRun] = {}


def lora_run(tmp_path_factory, name: str) -> LoraRun:
    """The run `name` of `LORA_RUNS`, trained on first use in this session."""
    if name not in _BUILT:
        _BUILT[name] = _train(tmp_path_factory, name)
    return _BUILT[name]


def tokenizer_dir(tmp_path_factory) -> Path:
    if "tokenizer" not in _BUILT:
        folder = tmp_path_factory.mktemp("lora_tokenizer")
        make_tokenizer(folder)
        _BUILT["tokenizer"] = folder
    return _BUILT["tokenizer"]


def base_model(tmp_path_factory, kind: str) -> tuple[Path, type]:
    """The base model folder of `kind` ("qwen2": tied Qwen2; "gpt2": untied GPT-2), built once."""
    key = f"base_{kind}"
    if key not in _BUILT:
        folder = tmp_path_factory.mktemp(key)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir(tmp_path_factory))
        if kind == "qwen2":
            make_tiny_qwen2(folder, tokenizer)
            from transformers import Qwen2ForCausalLM as model_class
        else:
            config = GPT2Config(
                vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            torch.manual_seed(0)
            GPT2LMHeadModel(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            model_class = GPT2LMHeadModel
        _BUILT[key] = (folder, model_class)
    return _BUILT[key]


def _train(tmp_path_factory, name: str) -> LoraRun:
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    spec = LORA_RUNS[name]
    base_dir, model_class = base_model(tmp_path_factory, spec["base"])
    root = tmp_path_factory.mktemp(f"lora_{name}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    torch.manual_seed(0)
    model = model_class.from_pretrained(base_dir, dtype=torch.float32)
    common = dict(
        output_dir=str(root / "run"), max_steps=max(STEPS), per_device_train_batch_size=2, learning_rate=2e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, save_strategy="steps", save_steps=STEPS[0], save_only_model=True,
        logging_steps=max(STEPS), report_to=[], max_length=32, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    preferences = make_preference_dataset(2 * max(STEPS))
    peft_config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **spec["lora"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():  # transformers' deprecations, peft's note on tied layers in the adapter
            warnings.simplefilter("ignore")
            if spec["trainer"] == "dpo":
                trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=preferences, processing_class=tokenizer, peft_config=peft_config)
            else:
                completions = Dataset.from_dict({"prompt": preferences["prompt"], "completion": preferences["chosen"]})
                trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=completions, processing_class=tokenizer, peft_config=peft_config)
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    return LoraRun(name, root / "run", base_dir, model_class)

