"""Tests for `bema_offline.train.demo`: the folders it writes, their compatibility with `transformers`, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bema_offline.train.demo import (
    TinyLlamaConfig,
    _heldout_windows,
    _write_model_folder,
    encode,
    heldout_loss,
    init_model,
    load_model,
    make_demo_run,
)
from bema_offline.errors import DataError

MODEL_FILES = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A shorter run than the demo's default (240 steps after 150 of pretraining), to keep the tests quick."""
    return make_demo_run(tmp_path_factory.mktemp("demo"), steps=100, save_every=25, pretrain_steps=60)


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    """A freshly initialised untied model, with norm weights moved off 1 so that they matter."""
    model = init_model(TinyLlamaConfig(tie_word_embeddings=False), torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    folder = tmp_path_factory.mktemp("untied") / "model"
    _write_model_folder(folder, model)
    return folder


def test_run_writes_base_and_trainer_checkpoints(demo_run):
    assert sorted(path.name for path in demo_run.run_dir.iterdir()) == sorted(
        ["base"] + [f"checkpoint-{step}" for step in (25, 50, 75, 100)])
    assert all((demo_run.base_dir / name).is_file() for name in MODEL_FILES)
    assert not (demo_run.base_dir / "trainer_state.json").exists()
    for folder in demo_run.checkpoint_dirs:
        assert all((folder / name).is_file() for name in MODEL_FILES + ["trainer_state.json"])
        step = int(folder.name.removeprefix("checkpoint-"))
        state = json.loads((folder / "trainer_state.json").read_text())
        assert (state["global_step"], state["max_steps"], state["save_steps"]) == (step, 100, 25)
        losses = [entry for entry in state["log_history"] if "loss" in entry]
        assert losses and step - state["logging_steps"] < losses[-1]["step"] <= step
        assert all(entry["step"] <= step for entry in state["log_history"])
        assert [entry["step"] for entry in state["log_history"] if "eval_loss" in entry][-1] == step


def test_checkpoints_are_tied_fp32_safetensors_matched_by_name(demo_run):
    names = set(load_file(demo_run.base_dir / "model.safetensors"))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert len(names) == 1 + 2 * 9 + 1  # embeddings, 9 tensors per layer, final norm
    for folder in demo_run.checkpoint_dirs:
        with safe_open(folder / "model.safetensors", framework="pt") as checkpoint:
            assert checkpoint.metadata() == {"format": "pt"}
            assert set(checkpoint.keys()) == names
            assert all(checkpoint.get_slice(name).get_dtype() == "F32" for name in names)
    assert json.loads((demo_run.base_dir / "config.json").read_text())["tie_word_embeddings"] is True


def test_finetuning_lowers_heldout_loss(demo_run):
    base_loss = heldout_loss(demo_run.base_dir)
    last_loss = demo_run.heldout_loss(demo_run.checkpoint_dirs[-1])
    assert last_loss < base_loss - 1.0
    evaluated = [entry["eval_loss"] for entry in demo_run.log_history if "eval_loss" in entry]
    assert evaluated[-1] == pytest.approx(last_loss, abs=1e-6)


@pytest.mark.parametrize("which", ["trained_tied", "untied"])
def test_transformers_llama_loads_folder_with_same_logits(demo_run, untied_model_dir, which):
    transformers = pytest.importorskip("transformers")
    folder = demo_run.checkpoint_dirs[-1] if which == "trained_tied" else untied_model_dir
    hf_model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    input_ids = _heldout_windows()[:4, :-1]
    with torch.no_grad():
        hf_logits = hf_model(input_ids).logits
        our_logits = load_model(folder)(input_ids)
    torch.testing.assert_close(our_logits, hf_logits, atol=1e-4, rtol=0)
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == (which == "trained_tied")
    generation_config = transformers.GenerationConfig.from_pretrained(folder)
    assert (generation_config.bos_token_id, generation_config.eos_token_id) == (1, 2)


def test_tokenizer_files_round_trip_in_transformers(demo_run):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(demo_run.base_dir)
    text = "7*8=56\nreverse moon: noom\ncount 3: 3 4 5 6"
    input_ids = tokenizer(text)["input_ids"]
    assert input_ids == encode(text).tolist()
    assert tokenizer.decode(input_ids) == text
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tokenizer("é")["input_ids"] == [tokenizer.unk_token_id]


def test_same_seed_gives_bit_identical_checkpoints(tmp_path):
    def small_run(folder, seed):
        return make_demo_run(tmp_path / folder, steps=20, save_every=10, pretrain_steps=10, seed=seed)

    first, second, other_seed = small_run("first", 3), small_run("second", 3), small_run("other", 4)
    for folder in [first.base_dir, *first.checkpoint_dirs]:
        tensors = load_file(folder / "model.safetensors")
        repeated = load_file(second.run_dir / folder.name / "model.safetensors")
        assert tensors.keys() == repeated.keys()
        assert all(torch.equal(tensors[name], repeated[name]) for name in tensors)
    last_other = load_file(other_seed.checkpoint_dirs[-1] / "model.safetensors")
    last_first = load_file(first.checkpoint_dirs[-1] / "model.safetensors")
    assert not torch.equal(last_other["model.norm.weight"], last_first["model.norm.weight"])


def test_load_model_reads_shards_by_name_and_rejects_foreign_tensors(untied_model_dir, tmp_path):
    tensors = load_file(untied_model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded_dir = tmp_path / "sharded"
    sharded_dir.mkdir()
    (sharded_dir / "config.json").write_text((untied_model_dir / "config.json").read_text())
    for shard_name, shard_names in shards.items():
        save_file({name: tensors[name].to(torch.bfloat16) for name in shard_names}, sharded_dir / shard_name)
    weight_map = {name: shard_name for shard_name, shard_names in shards.items() for name in shard_names}
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_model(sharded_dir).state_dict()
    assert all(torch.equal(loaded[name], tensors[name].to(torch.bfloat16).float()) for name in names)
    assert heldout_loss(sharded_dir) == pytest.approx(heldout_loss(untied_model_dir), abs=0.05)

    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((untied_model_dir / "config.json").read_text())
    with pytest.raises(DataError, match=r"missing \['lm_head.weight'\]"):
        load_model(tmp_path)
