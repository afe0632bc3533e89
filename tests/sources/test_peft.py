"""The PEFT adapter reader against peft itself: real adapter checkpoints written by TRL's trainers, and every way a
run's adapters can be wrong, each refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_lora import STEPS, lora_run

from bema_offline.errors import DataError
from bema_offline.files import OpenFiles
from bema_offline.sources.peft import (
    AdapterConfig,
    check_init,
    check_one_kind,
    load_adapter_checkpoint,
    load_adapter_run,
    pattern_key,
    read_adapter_config,
    read_module_factors,
    tied_weights,
)
from bema_offline.sources.run import find_checkpoints, load_source


def peft_model(run, step: int):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(run.load_base(), run.checkpoint(step))


def layout_of(run):
    return load_adapter_run(find_checkpoints(run.run_dir), load_source(run.base_dir, 0)).layout


@pytest.mark.parametrize("name", ["dpo", "sft", "dora", "lora_bias", "gpt2"])
def test_every_module_has_peft_s_rank_and_scaling(tmp_path_factory, name):
    """The layout names exactly the modules peft wraps, with peft's own r, scaling, and orientation."""
    from peft.tuners.lora import LoraLayer

    run = lora_run(tmp_path_factory, name)
    layout = layout_of(run)
    model = peft_model(run, STEPS[-1])
    peft_modules = {
        name.removeprefix("base_model.model."): module for name, module in model.named_modules() if isinstance(module, LoraLayer)
    }
    assert {m.module for m in layout.modules.values()} == set(peft_modules)
    for module in layout.modules.values():
        layer = peft_modules[module.module]
        assert module.rank == layer.r["default"]
        assert module.scaling == layer.scaling["default"]  # the same float, computed the same way
        assert module.transposed == (module.embedding or bool(getattr(layer, "fan_in_fan_out", False)))
        assert (module.magnitude is not None) == bool(layer.use_dora["default"])


def test_patterns_rslora_and_tensors_trained_in_full(tmp_path_factory):
    layout = layout_of(lora_run(tmp_path_factory, "sft"))
    ranks = {m.module: (m.rank, m.lora_alpha) for m in layout.modules.values()}
    assert ranks["model.layers.0.self_attn.v_proj"] == (2, 6)
    assert ranks["model.layers.1.self_attn.o_proj"] == (6, 6)
    assert ranks["model.layers.0.self_attn.o_proj"] == (4, 6)
    assert ranks["model.layers.0.mlp.up_proj"] == (4, 5)
    assert layout.modules["model.layers.0.mlp.up_proj.weight"].scaling == 5 / 2  # rslora: alpha / sqrt(r)
    # modules_to_save=[lm_head] on a tied model: the head is trained in full from the input embedding, and untied
    assert layout.full_tensors["lm_head.weight"].theta0 == "model.embed_tokens.weight"
    assert layout.untied == {"lm_head.weight": "model.embed_tokens.weight"}
    # bias="lora_only": the biases of the targeted q/k/v are trained in full
    biases = {name for name in layout.full_tensors if name.endswith(".bias")}
    assert biases == {f"model.layers.{i}.self_attn.{p}.bias" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")}
    assert layout.describe() == [
        "LoRA adapter: 10 modules (k_proj, o_proj, q_proj, up_proj, v_proj), scaling lora_alpha/sqrt(r) (rslora): "
        "r=2 alpha=6 s=4.24264; r=4 alpha=5 s=2.5; r=4 alpha=6 s=3; r=6 alpha=6 s=2.44949",
        "trained in full: " + ", ".join(layout.full_tensors),
        "untied from the input embedding: lm_head.weight (the output sets tie_word_embeddings false)",
    ]


def test_dora_lora_bias_and_gpt2_layouts(tmp_path_factory):
    dora = layout_of(lora_run(tmp_path_factory, "dora"))
    assert all(m.magnitude and m.rows_independent for m in dora.modules.values())
    assert "model.layers.0.self_attn.k_proj.bias" in dora.full_tensors  # bias="all": untargeted biases too
    lora_bias = layout_of(lora_run(tmp_path_factory, "lora_bias"))
    assert set(lora_bias.lora_biases) == {f"model.layers.{i}.self_attn.{p}.bias" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")}
    gpt2 = layout_of(lora_run(tmp_path_factory, "gpt2"))
    attention = gpt2.modules["transformer.h.0.attn.c_attn.weight"]
    assert attention.transposed and not attention.embedding and attention.shape == (32, 96)
    assert gpt2.modules["transformer.wte.weight"].embedding and not gpt2.untied


@pytest.mark.parametrize(
    "patterns, module",
    [
        ({"v_proj": 2}, "model.layers.0.self_attn.v_proj"),
        ({"proj": 2}, "model.layers.0.self_attn.v_proj"),  # a key must match a whole dotted part
        ({"layers.1.self_attn.o_proj": 6, "o_proj": 3}, "model.layers.1.self_attn.o_proj"),
        ({"o_proj": 3, "layers.1.self_attn.o_proj": 6}, "model.layers.1.self_attn.o_proj"),  # the first match wins
        ({r"layers\.[01]\..*q_proj": 5}, "model.layers.1.self_attn.q_proj"),
        ({"^model.layers.0.self_attn.q_proj": 5}, "model.layers.0.self_attn.q_proj"),
        ({"q_proj": 5}, "q_proj"),
    ],
)
def test_pattern_matching_is_peft_s(patterns, module):
    from peft.utils.other import get_pattern_key

    assert pattern_key(patterns, module) == get_pattern_key(list(patterns), module)


def copy_run(run, destination: Path) -> Path:
    shutil.copytree(run.run_dir, destination)
    return destination


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": 8}, "r is 8 but .*checkpoint-2/adapter_config.json has 4; the checkpoints come from different adapters"),
        ({"lora_alpha": 16}, "lora_alpha is 16 but .* has 12"),
        ({"target_modules": ["q_proj", "v_proj"]}, r"target_modules is \['q_proj', 'v_proj'\] but"),
        ({"use_rslora": True}, "use_rslora is True but"),
    ],
)
def test_configs_that_disagree_across_checkpoints(tmp_path_factory, tmp_path, changes, message):
    dpo = lora_run(tmp_path_factory, "dpo")
    run_dir = copy_run(dpo, tmp_path / "run")
    edit_config(run_dir / "checkpoint-4", **changes)
    with pytest.raises(DataError, match=message):
        load_adapter_run(find_checkpoints(run_dir), load_source(dpo.base_dir, 0))


def test_target_order_does_not_matter(tmp_path_factory, tmp_path):
    """peft saves target_modules from a set: its order differs between checkpoints of one run."""
    dpo = lora_run(tmp_path_factory, "dpo")
    run_dir = copy_run(dpo, tmp_path / "run")
    config = json.loads((run_dir / "checkpoint-4" / "adapter_config.json").read_text())
    edit_config(run_dir / "checkpoint-4", target_modules=list(reversed(config["target_modules"])))
    load_adapter_run(find_checkpoints(run_dir), load_source(dpo.base_dir, 0))


def test_factors_that_disagree_across_checkpoints(tmp_path_factory, tmp_path):
    dpo = lora_run(tmp_path_factory, "dpo")
    run_dir = copy_run(dpo, tmp_path / "run")
    path = run_dir / "checkpoint-6" / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    save_file(tensors, path)
    with pytest.raises(DataError, match=r"checkpoint-6/adapter_model.safetensors: tensor '.*layers.1.mlp.up_proj.lora_A.weight' is missing"):
        load_adapter_run(find_checkpoints(run_dir), load_source(dpo.base_dir, 0))


def save_base(source: Path, destination: Path, change) -> Path:
    shutil.copytree(source, destination)
    tensors = load_file(destination / "model.safetensors")
    change(tensors)
    save_file(tensors, destination / "model.safetensors")
    return destination


def test_a_target_missing_from_the_base(tmp_path_factory, tmp_path):
    dpo = lora_run(tmp_path_factory, "dpo")
    base = save_base(dpo.base_dir, tmp_path / "base", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(DataError, match=r"targets 'model.layers.1.mlp.down_proj' but the base model .* has no tensor 'model.layers.1.mlp.down_proj.weight'; pass the base model"):
        load_adapter_run(find_checkpoints(dpo.run_dir), load_source(base, 0))


def test_a_factor_shape_that_does_not_fit_the_base(tmp_path_factory, tmp_path):
    dpo = lora_run(tmp_path_factory, "dpo")
    base = save_base(dpo.base_dir, tmp_path / "base", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(48, 32)}))
    with pytest.raises(DataError, match=r"module 'model.layers.0.mlp.up_proj' has lora_A \[4, 32\] and lora_B \[64, 4\], which do not fit the base tensor .* \[48, 32\]"):
        load_adapter_run(find_checkpoints(dpo.run_dir), load_source(base, 0))


def test_a_full_tensor_of_another_vocabulary(tmp_path_factory, tmp_path):
    sft = lora_run(tmp_path_factory, "sft")
    base = save_base(sft.base_dir, tmp_path / "base", lambda t: t.update({"model.embed_tokens.weight": torch.zeros(170, 32)}))
    with pytest.raises(DataError, match=r"'base_model.model.lm_head.weight' has shape \[169, 32\] but the base tensor 'model.embed_tokens.weight' has \[170, 32\]; was the vocabulary resized"):
        load_adapter_run(find_checkpoints(sft.run_dir), load_source(base, 0))


def test_a_mix_of_adapter_and_full_checkpoints(tmp_path_factory, tmp_path):
    dpo = lora_run(tmp_path_factory, "dpo")
    run_dir = copy_run(dpo, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoint-4")
    shutil.copytree(dpo.base_dir, run_dir / "checkpoint-4")
    with pytest.raises(DataError, match=r"checkpoint-2 is a PEFT adapter checkpoint \(adapter_config.json\) but .*checkpoint-4 is not; a run is one or the other"):
        load_adapter_run(find_checkpoints(run_dir), load_source(dpo.base_dir, 0))
    assert check_one_kind({2: dpo.checkpoint(2), 4: dpo.checkpoint(4)}) is True
    assert check_one_kind({0: dpo.base_dir}) is False


def test_pissa_is_refused_when_the_base_would_be_theta0(tmp_path_factory, tmp_path):
    """A real PiSSA adapter: peft moved the principal components of W0 into the factors at init, so the base is not θ0;
    with no weight on the base (`--update-after` a saved step) the base must be the residual model, which a note says."""
    from peft import LoraConfig, get_peft_model

    dpo = lora_run(tmp_path_factory, "dpo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(dpo.load_base(), LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"]))
        model.save_pretrained(tmp_path / "checkpoint-1")
    config = load_adapter_checkpoint(tmp_path / "checkpoint-1", 1).config
    message = r"init_lora_weights 'pissa' changes the base weights at init, so the base model is not θ0; pass --update-after with a saved step"
    with pytest.raises(DataError, match=message) as error:
        check_init(config, base_is_theta0=True)
    assert str(config.path) in str(error.value) and "\n" not in str(error.value)
    assert "residual model peft made at init" in check_init(config, base_is_theta0=False)


@pytest.mark.parametrize(
    "init, refused, note",
    [
        ("olora", "'olora' changes the base weights at init", True),
        ("pissa_niter_4", "'pissa_niter_4' changes the base weights", True),
        ("loftq", "'loftq' changes the base weights", True),
        ("corda", "'corda' changes the base weights", True),
        (False, "init_lora_weights is false .* the base model is not θ0; pass --update-after", False),
    ],
)
def test_inits_after_which_the_base_is_not_theta0(tmp_path_factory, tmp_path, init, refused, note):
    """Refused when an output weighs the base; a random init (false) is then exact on the base, the others need the
    residual model (a note)."""
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(lora_run(tmp_path_factory, "dpo").checkpoint(2), folder)
    edit_config(folder, init_lora_weights=init)
    config = read_adapter_config(folder / "adapter_config.json")
    with pytest.raises(DataError, match=refused):
        check_init(config, base_is_theta0=True)
    assert (check_init(config, base_is_theta0=False) is not None) == note


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"init_lora_weights": "mystery"}, "unknown init_lora_weights 'mystery'"),
        ({"peft_type": "IA3"}, "a IA3 adapter; only LoRA adapters"),
        ({"use_qalora": True}, r"uses QA-LoRA \(use_qalora\), which bema-offline cannot average"),
        ({"layer_replication": [[0, 2]]}, "uses layer replication"),
        ({"r": 0}, "r is 0; a LoRA rank is a positive integer"),
        ({"r": "4"}, "r is '4', expected an integer; re-save the adapter with peft"),
        ({"lora_alpha": True}, "lora_alpha is True, expected a number"),
        ({"use_dora": "yes"}, "use_dora is 'yes', expected true or false"),
        ({"target_modules": 3}, "target_modules is 3, expected a list or a string"),
        ({"bias": "some"}, "bias is 'some'; peft knows none, all, lora_only"),
        ({"rank_pattern": {"q_proj": -1}}, r"rank_pattern\['q_proj'\] is -1"),
        ({"rank_pattern": {"(": 2}}, "rank_pattern key '\\(' is not a regular expression"),
    ],
)
def test_configs_refused_in_one_line(tmp_path_factory, tmp_path, changes, message):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(lora_run(tmp_path_factory, "dpo").checkpoint(2), folder)
    edit_config(folder, **changes)
    with pytest.raises(DataError, match=message) as error:
        read_adapter_config(folder / "adapter_config.json")
    assert "\n" not in str(error.value) and str(folder / "adapter_config.json") in str(error.value)


@pytest.mark.parametrize("init", [True, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_start_at_the_base_are_accepted(tmp_path_factory, tmp_path, init):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(lora_run(tmp_path_factory, "dpo").checkpoint(2), folder)
    edit_config(folder, init_lora_weights=init)
    config = read_adapter_config(folder / "adapter_config.json")
    assert config.init_lora_weights == init
    assert check_init(config, base_is_theta0=True) is None


def test_broken_files(tmp_path_factory, tmp_path):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(lora_run(tmp_path_factory, "dpo").checkpoint(2), folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(DataError, match="has adapter_config.json but no adapter_model.safetensors or adapter_model.bin; the checkpoint is incomplete"):
        load_adapter_checkpoint(folder, 2)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed adapter config"):
        load_adapter_checkpoint(folder, 2)
    (folder / "adapter_config.json").write_text("[]")
    with pytest.raises(DataError, match="not a JSON object"):
        load_adapter_checkpoint(folder, 2)


def test_keys_that_are_not_peft_s(tmp_path_factory, tmp_path):
    dpo = lora_run(tmp_path_factory, "dpo")
    base = load_source(dpo.base_dir, 0)
    cases = [
        ({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, "does not start with 'base_model.model.'"),
        ({"base_model.model.model.norm.weight": torch.zeros(32)}, "neither a LoRA factor nor in modules_to_save"),
        ({"base_model.model.model.embed_tokens.weight": torch.zeros(8, 32)}, "a whole embedding layer that peft saved beside the adapter"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, "has no lora_B tensor"),
    ]
    for index, (tensors, message) in enumerate(cases):
        folder = tmp_path / f"checkpoint-{index + 1}"
        shutil.copytree(dpo.checkpoint(2), folder)
        (folder / "adapter_model.safetensors").unlink()
        save_file(tensors, folder / "adapter_model.safetensors")
        edit_config(folder, target_modules=None)
        with pytest.raises(DataError, match=message):
            load_adapter_run({index + 1: folder}, base)


def test_factors_the_config_does_not_target(tmp_path_factory, tmp_path):
    dpo = lora_run(tmp_path_factory, "dpo")
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(dpo.checkpoint(2), folder)
    edit_config(folder, target_modules=["q_proj"])
    with pytest.raises(DataError, match="has LoRA factors but target_modules does not name it"):
        load_adapter_run({2: folder}, load_source(dpo.base_dir, 0))


def test_lora_bias_on_a_module_without_a_bias(tmp_path_factory, tmp_path):
    from peft import LoraConfig, get_peft_model

    dpo = lora_run(tmp_path_factory, "dpo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(dpo.load_base(), LoraConfig(r=2, lora_bias=True, target_modules=["o_proj"]))
        model.save_pretrained(tmp_path / "checkpoint-1")
    with pytest.raises(DataError, match="has a lora_bias but the base has no bias 'model.layers.0.self_attn.o_proj.bias'"):
        load_adapter_run({1: tmp_path / "checkpoint-1"}, load_source(dpo.base_dir, 0))


def test_a_bin_adapter_reads_as_its_safetensors_twin(tmp_path_factory, tmp_path):
    """Older runs saved `adapter_model.bin`: the same tensors, the same layout."""
    dpo = lora_run(tmp_path_factory, "dpo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model(dpo, 4).save_pretrained(tmp_path / "checkpoint-4", safe_serialization=False)
    assert (tmp_path / "checkpoint-4" / "adapter_model.bin").is_file()
    twin, binary = load_adapter_checkpoint(dpo.checkpoint(4), 4), load_adapter_checkpoint(tmp_path / "checkpoint-4", 4)
    assert binary.shapes == twin.shapes and binary.loaded is not None
    base = load_source(dpo.base_dir, 0)
    layout = load_adapter_run({4: tmp_path / "checkpoint-4"}, base).layout
    assert layout.modules == load_adapter_run({4: dpo.checkpoint(4)}, base).layout.modules
    with OpenFiles() as files:
        for module in layout.modules.values():
            a, b = read_module_factors(module, binary, files, torch.float32), read_module_factors(module, twin, files, torch.float32)
            assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        key = next(iter(layout.modules.values())).lora_B
        assert torch.equal(binary.read_tensor(key, files, rows=(3, 9)), twin.read_tensor(key, files, rows=(3, 9)))


def test_a_bin_adapter_that_is_a_fifo_or_holds_an_unknown_dtype_gets_one_line(tmp_path_factory, tmp_path):
    dpo = lora_run(tmp_path_factory, "dpo")
    fifo = tmp_path / "checkpoint-2"
    fifo.mkdir()
    shutil.copy(dpo.checkpoint(2) / "adapter_config.json", fifo)
    os.mkfifo(fifo / "adapter_model.bin")
    with pytest.raises(DataError, match="adapter_model.bin: not a regular file"):
        load_adapter_checkpoint(fifo, 2)
    odd = tmp_path / "checkpoint-4"
    odd.mkdir()
    shutil.copy(dpo.checkpoint(4) / "adapter_config.json", odd)
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2, dtype=torch.complex64)}, odd / "adapter_model.bin")
    with pytest.raises(DataError, match="torch.complex64, a dtype this tool does not read"):
        load_adapter_checkpoint(odd, 4)


def test_tied_head_detection(tmp_path_factory):
    qwen = load_source(lora_run(tmp_path_factory, "dpo").base_dir, 0)
    assert tied_weights(qwen) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_weights(qwen, {"tie_word_embeddings": False}) == {}
    gpt2 = load_source(lora_run(tmp_path_factory, "gpt2").base_dir, 0)
    assert tied_weights(gpt2) == {}  # an untied GPT-2 saves its lm_head


def test_config_defaults_of_older_peft_versions(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    config = read_adapter_config(path)
    assert isinstance(config, AdapterConfig)
    assert (config.use_rslora, config.rank_pattern, config.use_dora, config.bias, config.modules_to_save) == (False, {}, False, "none", ())
    assert config.scaling("model.layers.0.self_attn.q_proj") == 2.0


def test_modules_to_save_names_modules_by_peft_s_plain_suffix_rule(tmp_path_factory, tmp_path):
    """peft's `_set_trainable` matches `key.endswith(name)`: `head` names `lm_head` (peft 0.21)."""
    dpo = lora_run(tmp_path_factory, "dpo")
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(dpo.checkpoint(2), folder)
    edit_config(folder, modules_to_save=["head"])
    config = load_adapter_checkpoint(folder, 2).config
    assert config.saves_module("lm_head") and config.saves_module("model.lm_head") and not config.saves_module("lm_head.proj")
