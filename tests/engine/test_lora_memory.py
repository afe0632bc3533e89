"""Peak RSS of a LoRA run, as the OS reports it, stays within `--max-memory` plus a constant, however large the base."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_memory import LAUNCHER
from tiny_lora import STEPS, lora_run, quiet


def peak_rss_mib(args) -> float:
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "bema_offline", *map(str, args)],
        capture_output=True, text=True, check=True,
    )
    code, maxrss_kib = map(int, result.stdout.split())
    assert code == 0, result.stderr
    return maxrss_kib / 1024


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """A 120 MiB fp32 base (an untied Llama, 8 layers of 512 × 1536 MLPs) and three r=16 adapters on every linear
    layer, written by transformers and peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora_big")
    config = LlamaConfig(
        vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    model = quiet(get_peft_model, LlamaForCausalLM.from_pretrained(root / "base"), LoraConfig(r=16, target_modules="all-linear"))
    for step in STEPS:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data += 0.01 * torch.randn_like(parameter)
        quiet(model.save_pretrained, root / "run" / f"checkpoint-{step}")
    return root / "run", root / "base"


@pytest.mark.parametrize("budget_mib", [16, 64])
def test_peak_rss_is_bounded_by_the_budget(tmp_path_factory, tmp_path, big_run, budget_mib):
    """A run that reads a 120 MiB base grows past a run on a 0.2 MiB one by at most the budget and a little slack:
    Python, torch and the card are the same in both."""
    tiny = lora_run(tmp_path_factory, "dpo")
    options = ["--update-freq", "2", "-q", "--max-memory", f"{budget_mib}MiB", "--save", "ema,bema"]
    baseline = peak_rss_mib(["average", tiny.run_dir, "-o", tmp_path / "tiny-out", *options])
    run_dir, base_dir = big_run
    peak = peak_rss_mib(["average", run_dir, "--base-model", base_dir, "-o", tmp_path / "big-out", *options])
    assert peak - baseline < budget_mib + 24, (peak, baseline)
