"""`bema-average` on LoRA runs, end to end from the command line: real TRL DPO and SFT runs with a `peft.LoraConfig`
(`tests/tiny_lora.py`), every output checked against peft itself.

- merged: every tensor equals the float64 Σ wᵢ·(peft's `merge_and_unload()` of checkpoint i) within float32 rounding;
- adapter: the folder loads with `PeftModel.from_pretrained(base, OUT)` and gives the merged output's logits;
- `--lora-rank` at full rank reproduces the lossless adapter, below it the recorded errors are a dense SVD's;
- every error of issue 11 in one line, with its exit code, and nothing written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lora import BATCH, EPS32, STEPS, assert_equals_peft, float64_reference, lora_run, quiet

from bema_offline.cli import _run, average_command


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run `bema-average ARGS` as a user would; return (exit code, stdout, stderr)."""
    capsys.readouterr()  # what the test printed before (transformers' loading bars) is not the command's
    with pytest.raises(SystemExit) as exit_info:
        _run(average_command, [str(a) for a in args], prog_name="bema-average")
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def record_of(folder: Path) -> dict:
    return json.loads((folder / "bema_offline.json").read_text())


def weights_of(folder: Path) -> dict[int, float]:
    return {entry["step"]: entry["weight"] for entry in record_of(folder)["effective_weights"]}


def assert_one_line_error(code, err, expected_code, *needles, output: Path):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not output.exists() and not list(output.parent.glob(f".{output.name}.bema-*")), "something was written"


def copy_run(run, into: Path) -> Path:
    shutil.copytree(run.run_dir, into, ignore=shutil.ignore_patterns("bema-offline*"))
    return into


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return quiet(AutoModelForCausalLM.from_pretrained, folder, dtype=torch.float32)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(BATCH).logits


# --- merged -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_merged_bema_equals_the_float64_sum_of_peft_merges(tmp_path_factory, tmp_path, capsys, name):
    """No --base-model: the base is the folder the adapter config names. The output is an ordinary model folder."""
    run = lora_run(tmp_path_factory, name)
    before = tree_hash(run.run_dir), tree_hash(run.base_dir)
    out = tmp_path / "out"
    code, stdout, err = run_cli([run.run_dir, "--update-freq", "2", "-o", out], capsys)
    assert code == 0, err
    assert f"wrote {out}: bema at step 6" in stdout
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "bema_offline.json"} <= {p.name for p in out.iterdir()}
    weights = weights_of(out)
    assert sorted(weights) == [0, 2, 4, 6] and weights[0] < 0
    assert_equals_peft(run, load_file(out / "model.safetensors"), weights)
    record = record_of(out)
    assert record["lora"]["output"] == "merged" and "op-by-op replay" in record["lora"]["arithmetic"]
    assert [entry["step"] for entry in record["inputs"]] == [0, 2, 4, 6]
    assert record["base_model"] == str(run.base_dir.resolve())
    card = (out / "README.md").read_text()
    assert "## LoRA" in card and "merged model" in card and "library_name: transformers" in card
    # loads as a plain model; a head the adapter changed beside its tied embedding is untied
    model = load_model(out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is (name == "dpo")
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is (name == "dpo")
    assert (tree_hash(run.run_dir), tree_hash(run.base_dir)) == before


def test_every_method_and_a_sweep_mixing_them(tmp_path_factory, tmp_path, capsys):
    """One read, one folder per config: BEMA (from its effective weights), EMA, a uniform window and ExPO."""
    run = lora_run(tmp_path_factory, "sft")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "- {name: bema}\n- {name: ema, method: ema}\n- {name: last2, method: uniform, last: 2}\n"
        "- {name: expo, method: expo, alpha: 0.5, ref_step: 2}\n"
    )
    out = tmp_path / "out"
    code, stdout, err = run_cli([run.run_dir, "--update-freq", "2", "--sweep", sweep, "-o", out, "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["bema", "ema", "expo", "last2"]
    assert weights_of(out / "last2") == {4: 0.5, 6: 0.5}
    assert weights_of(out / "expo") == pytest.approx({2: -0.5, 6: 1.5})
    for config in ("bema", "ema", "last2", "expo"):
        assert_equals_peft(run, load_file(out / config / "model.safetensors"), weights_of(out / config))
    assert record_of(out / "expo")["method"]["method"] == "expo"


def test_update_after_a_saved_step_and_float64_and_bf16(tmp_path_factory, tmp_path, capsys):
    """θ0 = checkpoint-2: no weight on the base, which is still W0 of every checkpoint."""
    run = lora_run(tmp_path_factory, "dpo")
    out = tmp_path / "out"
    code, _, err = run_cli([run.run_dir, "--update-freq", "2", "--update-after", "2", "--accum-dtype", "float64", "-o", out, "-q"], capsys)
    assert code == 0, err
    weights = weights_of(out)
    assert sorted(weights) == [2, 4, 6]
    assert_equals_peft(run, load_file(out / "model.safetensors"), weights)
    assert record_of(out)["inputs"][0]["step"] == 0  # the base is read (W0) although it has no weight
    code, _, err = run_cli([run.run_dir, "--update-freq", "2", "--dtype", "bfloat16", "-o", tmp_path / "bf16", "-q"], capsys)
    assert code == 0, err
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    for name, value in bf16.items():  # the float32 average, rounded once
        expected, tolerance = float64_reference(run, name, weights_of(tmp_path / "bf16"))
        assert float((value.double() - expected).abs().max()) <= tolerance + 2**-8 * float(expected.abs().max()), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dora_merged_and_refused_as_an_adapter(tmp_path_factory, tmp_path, capsys):
    run = lora_run(tmp_path_factory, "dora")
    out = tmp_path / "out"
    code, _, err = run_cli([run.run_dir, "--update-freq", "2", "-o", out, "-q"], capsys)
    assert code == 0, err
    assert_equals_peft(run, load_file(out / "model.safetensors"), weights_of(out))
    code, _, err = run_cli([run.run_dir, "--update-freq", "2", "--lora-output", "adapter", "-o", tmp_path / "adapter"], capsys)
    assert_one_line_error(code, err, 2, "DoRA adapter (use_dora)", "use the default --lora-output merged", output=tmp_path / "adapter")
    code, _, err = run_cli([run.run_dir, "--update-freq", "2", "--lora-average", "factors", "-o", tmp_path / "f"], capsys)
    assert_one_line_error(code, err, 2, "--lora-average factors", "DoRA", output=tmp_path / "f")


def test_factors_mode_warns_and_records_each_module_s_difference(tmp_path_factory, tmp_path, capsys):
    """W0 + s·(Σ wᵢBᵢ)(Σ wᵢAᵢ), written out in float64 from safetensors' reader; the warning and the differences."""
    run = lora_run(tmp_path_factory, "dpo")
    out = tmp_path / "out"
    code, _, err = run_cli([run.run_dir, "--method", "uniform", "-o", out], capsys)
    assert code == 0, err
    code, _, err = run_cli([run.run_dir, "--method", "uniform", "--lora-average", "factors", "-o", tmp_path / "factors"], capsys)
    assert code == 0, err
    assert "warning: --lora-average factors averaged A and B separately" in err
    base = load_file(run.base_dir / "model.safetensors")
    adapters = {step: load_file(run.checkpoint(step) / "adapter_model.safetensors") for step in STEPS}
    ours = load_file(tmp_path / "factors" / "model.safetensors")
    differences = record_of(tmp_path / "factors")["lora"]["factor_differences"]
    assert len(differences) == 14 and min(differences.values()) > 1e-3
    for module, difference in differences.items():
        key = f"base_model.model.{module}"
        a = sum(adapters[s][f"{key}.lora_A.weight"].double() for s in STEPS) / 3
        b = sum(adapters[s][f"{key}.lora_B.weight"].double() for s in STEPS) / 3
        exact = sum(adapters[s][f"{key}.lora_B.weight"].double() @ adapters[s][f"{key}.lora_A.weight"].double() for s in STEPS) / 3
        expected = base[f"{module}.weight"].double() + 3.0 * b @ a  # lora_alpha 12 / r 4
        assert float((ours[f"{module}.weight"].double() - expected).abs().max()) <= 8 * EPS32 * float(expected.abs().max())
        dense = float(torch.linalg.matrix_norm(b @ a - exact) / torch.linalg.matrix_norm(exact))
        assert difference == pytest.approx(dense, rel=1e-6)
    assert "**Warning:** A and B were averaged separately" in (tmp_path / "factors" / "README.md").read_text()


# --- adapter ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_adapter_output_loads_with_peft_and_gives_the_merged_logits(tmp_path_factory, tmp_path, capsys, name):
    from peft import PeftModel

    run = lora_run(tmp_path_factory, name)
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert run_cli([run.run_dir, "--update-freq", "2", "-o", merged, "-q"], capsys)[0] == 0
    code, stdout, err = run_cli([run.run_dir, "--update-freq", "2", "--lora-output", "adapter", "-o", adapter], capsys)
    assert code == 0, err
    assert f"wrote {adapter}: bema at step 6 (a PEFT adapter)" in stdout
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "bema_offline.json"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "config.json").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 * 3 and config["lora_alpha"] == config["r"]  # lossless: three checkpoints' factors stacked
    assert config["base_model_name_or_path"] == str(run.base_dir.resolve())
    model = quiet(PeftModel.from_pretrained, run.load_base(), adapter)
    expected = logits(load_model(merged))
    assert float((logits(model) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert_equals_peft(run, {k: v for k, v in quiet(model.merge_and_unload).state_dict().items()}, weights_of(adapter))
    record = record_of(adapter)
    assert record["lora"]["output"] == "adapter" and record["lora"]["ranks"]
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card


def test_lora_rank_at_full_rank_is_lossless_and_below_it_reports_a_dense_svd_s_error(tmp_path_factory, tmp_path, capsys):
    run = lora_run(tmp_path_factory, "dpo")
    outs = {rank: tmp_path / f"r{rank}" for rank in ("lossless", 12, 2)}
    assert run_cli([run.run_dir, "--update-freq", "2", "--lora-output", "adapter", "-o", outs["lossless"], "-q"], capsys)[0] == 0
    for rank in (12, 2):
        code, _, err = run_cli([run.run_dir, "--update-freq", "2", "--lora-output", "adapter", "--lora-rank", rank, "-o", outs[rank], "-q"], capsys)
        assert code == 0, err
    factors = {rank: load_file(out / "adapter_model.safetensors") for rank, out in outs.items()}
    errors = record_of(outs[2])["lora"]["truncation_errors"]
    assert record_of(outs[2])["lora"]["max_truncation_error"] == max(errors.values())
    assert "truncated to rank 2 by SVD" in (outs[2] / "README.md").read_text()
    for key in [k for k in factors["lossless"] if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b_key = key.replace("lora_A", "lora_B")
        delta = {rank: f[b_key].double() @ f[key].double() for rank, f in factors.items()}  # scaling 1: lora_alpha = r
        assert factors[12][key].shape[0] == 12 and factors[2][key].shape[0] == 2
        assert float((delta[12] - delta["lossless"]).abs().max()) <= 64 * EPS32 * float(delta["lossless"].abs().max())
        sigma = torch.linalg.svdvals(delta["lossless"])
        dense = float(sigma[2:].square().sum().sqrt() / sigma.square().sum().sqrt())
        assert errors[module] == pytest.approx(dense, rel=1e-6)
        assert float(torch.linalg.matrix_norm(delta[2] - delta["lossless"])) == pytest.approx(dense * float(torch.linalg.matrix_norm(delta["lossless"])), rel=1e-6)


# --- dry run and option errors ----------------------------------------------------------------------------------


def test_dry_run_shows_targets_rank_scaling_and_base(tmp_path_factory, tmp_path, capsys):
    run = lora_run(tmp_path_factory, "sft")
    out = tmp_path / "out"
    code, stdout, err = run_cli([run.run_dir, "--update-freq", "2", "--lora-output", "adapter", "--lora-rank", "8", "-o", out, "--dry-run"], capsys)
    assert code == 0, err
    assert f"base model (W0): {run.base_dir}" in stdout
    assert "LoRA adapter: 10 modules (k_proj, o_proj, q_proj, up_proj, v_proj), scaling lora_alpha/sqrt(r) (rslora)" in stdout
    assert "r=2 alpha=6 s=4.24264" in stdout and "r=6 alpha=6 s=2.44949" in stdout
    assert "trained in full: lm_head.weight" in stdout and "untied from the input embedding: lm_head.weight" in stdout
    assert "output: a PEFT adapter folder, truncated to rank 8 by SVD" in stdout
    assert "computed from their effective weights" in stdout and not out.exists()


@pytest.mark.parametrize(
    "options, needle",
    [
        (["--lora-rank", "4"], "--lora-rank truncates an adapter output; add --lora-output adapter"),
        (["--lora-output", "adapter", "--lora-rank", "4", "--lora-average", "factors"], "does not combine with --lora-average factors"),
        (["--lora-output", "adapter", "--device", "cuda"], "--device"),
    ],
)
def test_option_errors(tmp_path_factory, tmp_path, capsys, options, needle):
    run = lora_run(tmp_path_factory, "dpo")
    code, _, err = run_cli([run.run_dir, "--update-freq", "2", "-o", tmp_path / "out", *options], capsys)
    assert_one_line_error(code, err, 2, needle, output=tmp_path / "out")


def test_lora_options_on_a_full_run(tmp_path, capsys):
    from synthetic import make_run

    run_dir, base_dir, _ = make_run(tmp_path, [2, 4])
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "--lora-output", "adapter", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 2, "--lora-output: ", "holds full model checkpoints, not LoRA adapters", output=tmp_path / "out")


# --- bad data: one line, exit 1, nothing written ----------------------------------------------------------------


def test_a_config_that_disagrees_across_checkpoints(tmp_path_factory, tmp_path, capsys):
    run_dir = copy_run(lora_run(tmp_path_factory, "dpo"), tmp_path / "run")
    edit_config(run_dir / "checkpoint-4", lora_alpha=16)
    code, _, err = run_cli([run_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 1, "checkpoint-4/adapter_config.json: lora_alpha is 16", "different adapters", output=tmp_path / "out")


def test_a_target_missing_from_the_base_and_a_shape_mismatch(tmp_path_factory, tmp_path, capsys):
    dpo, gpt2 = lora_run(tmp_path_factory, "dpo"), lora_run(tmp_path_factory, "gpt2")
    code, _, err = run_cli([dpo.run_dir, "--base-model", gpt2.base_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 1, "but the base model", "has no tensor", "--base-model", output=tmp_path / "out")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    wider = tmp_path / "wider"
    config = Qwen2Config.from_pretrained(dpo.base_dir)
    config.intermediate_size = 96
    Qwen2ForCausalLM(config).save_pretrained(wider)
    code, _, err = run_cli([dpo.run_dir, "--base-model", wider, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 1, "which do not fit the base tensor", "pass the base model this adapter was trained on", output=tmp_path / "out")


def test_a_base_that_cannot_be_found(tmp_path_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = copy_run(lora_run(tmp_path_factory, "dpo"), tmp_path / "run")
    for step in STEPS:
        edit_config(run_dir / f"checkpoint-{step}", base_model_name_or_path=str(tmp_path / "gone"))
    code, _, err = run_cli([run_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 1, "checkpoint-6/adapter_config.json: cannot find the base model", "pass the model the adapter was trained on with --base-model", output=tmp_path / "out")
    for step in STEPS:
        edit_config(run_dir / f"checkpoint-{step}", base_model_name_or_path="no-such-org/no-such-model")
    code, _, err = run_cli([run_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 1, "cannot find the base model 'no-such-org/no-such-model'", "Hub", output=tmp_path / "out")
    for step in STEPS:
        edit_config(run_dir / f"checkpoint-{step}", base_model_name_or_path=None)
    code, _, err = run_cli([run_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 1, "names no base model (base_model_name_or_path)", output=tmp_path / "out")


def test_a_mix_of_adapter_and_full_checkpoints(tmp_path_factory, tmp_path, capsys):
    dpo = lora_run(tmp_path_factory, "dpo")
    run_dir = copy_run(dpo, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoint-4")
    shutil.copytree(dpo.base_dir, run_dir / "checkpoint-4")
    code, _, err = run_cli([run_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 1, "is a PEFT adapter checkpoint (adapter_config.json) but", "checkpoint-4 is not", output=tmp_path / "out")


def test_a_pissa_adapter_is_refused_unless_no_output_weighs_the_base(tmp_path_factory, tmp_path, capsys):
    """Real PiSSA checkpoints made by peft: the base model is not θ0."""
    from peft import LoraConfig, get_peft_model

    dpo = lora_run(tmp_path_factory, "dpo")
    model = quiet(get_peft_model, dpo.load_base(), LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]))
    for step in (2, 4):
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data += 0.01 * torch.randn_like(parameter)  # as if trained
        quiet(model.save_pretrained, tmp_path / "run" / f"checkpoint-{step}")
    code, _, err = run_cli([tmp_path / "run", "--base-model", dpo.base_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, 1, "init_lora_weights 'pissa' changes the base weights at init", "--update-after", output=tmp_path / "out")
    code, stdout, err = run_cli([tmp_path / "run", "--base-model", dpo.base_dir, "--method", "uniform", "-o", tmp_path / "out", "--dry-run"], capsys)
    assert code == 0, err
    assert "note: init_lora_weights 'pissa': the checkpoints are W + s·B·A on the residual model" in stdout


def test_every_update_and_a_base_other_than_the_adapters(tmp_path_factory, tmp_path, capsys):
    """--every-update --save ema,bema: one folder per kind and step, each the average of its own weights. A base
    model given by path to the same folder is no news; a copy elsewhere is named in a note."""
    run = lora_run(tmp_path_factory, "dpo")
    out = tmp_path / "out"
    code, _, err = run_cli([run.run_dir, "--base-model", run.base_dir, "--update-freq", "2", "--every-update", "--save", "ema,bema", "-o", out], capsys)
    assert code == 0, err
    assert "base_model_name_or_path" not in err
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/step-*")) == [f"{kind}/step-{step}" for kind in ("bema", "ema") for step in STEPS]
    for folder in (out / "ema" / "step-2", out / "bema" / "step-4"):
        assert_equals_peft(run, load_file(folder / "model.safetensors"), weights_of(folder))
    copy = tmp_path / "copy"
    shutil.copytree(run.base_dir, copy)
    code, _, err = run_cli([run.run_dir, "--base-model", copy, "--update-freq", "2", "-o", tmp_path / "other"], capsys)
    assert code == 0, err
    assert f"note: the adapters name {str(run.base_dir)!r} as their base model (base_model_name_or_path); W0 is the base model given, {copy}" in err
