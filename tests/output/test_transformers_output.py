"""The output folder is an ordinary Hugging Face model: `from_pretrained` loads it, and it generates."""

import torch
from safetensors.torch import load_file
from tiny_hf import make_tiny_qwen2, make_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from bema_offline import BEMASchedule, average


def test_output_loads_in_transformers_and_generates(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "base")
    model = make_tiny_qwen2(tmp_path / "base", tokenizer, tie_word_embeddings=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in (5, 10, 15):
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
            model.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
            tokenizer.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    assert "lm_head.weight" not in load_file(tmp_path / "run" / "checkpoint-5" / "model.safetensors")

    out = tmp_path / "avg"
    average(tmp_path / "run", out, schedule=BEMASchedule(update_freq=5), base_model=tmp_path / "base", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / name).is_file(), name

    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = {}
    for shard in out.glob("*.safetensors"):
        expected.update(load_file(shard))
    state = loaded.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    # tied embeddings: lm_head is the averaged embedding
    assert torch.equal(state["lm_head.weight"], expected["model.embed_tokens.weight"])

    tok = PreTrainedTokenizerFast.from_pretrained(out)
    inputs = tok("the cat", return_tensors="pt")
    generated = loaded.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 5)
