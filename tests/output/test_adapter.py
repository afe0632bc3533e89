"""`--lora-output adapter` against peft: the folder loads with `PeftModel.from_pretrained`, its merge equals the float64
sum of peft's merges of the checkpoints, its logits equal the merged average's, and a truncated rank reports the
error a dense float64 SVD gives."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_lora import STEPS, lora_run

from bema_offline.engine.lora import iter_merged
from bema_offline.errors import UsageError
from bema_offline.files import OpenFiles
from bema_offline.methods.schedule import BEMASchedule, effective_weights
from bema_offline.output.adapter import output_rank, truncate, write_adapter
from bema_offline.sources.peft import load_adapter_run, read_module_factors
from bema_offline.sources.run import find_checkpoints, load_source

EPS32 = torch.finfo(torch.float32).eps
WEIGHTS = effective_weights(BEMASchedule(update_freq=2), list(STEPS), [STEPS[-1]])[STEPS[-1]]
BATCH = torch.tensor([[2, 10, 20, 30, 40, 50, 3], [2, 60, 70, 80, 90, 100, 3]])


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def merged_state(adapter) -> dict[str, torch.Tensor]:
    """peft's merge of an adapter model (peft notes that it unties a tied head it changed: so do we)."""
    return quiet(adapter.merge_and_unload).state_dict()


class Prepared:
    """A run, its layout, and peft's merge of the base and of every checkpoint."""

    def __init__(self, run):
        from peft import PeftModel

        self.run = run
        self.base = load_source(run.base_dir, 0)
        self.adapters = load_adapter_run(find_checkpoints(run.run_dir), self.base)
        self.merged = {0: run.load_base().state_dict()}
        for step in STEPS:
            self.merged[step] = merged_state(quiet(PeftModel.from_pretrained, run.load_base(), run.checkpoint(step)))

    def reference(self, name: str, weights: dict[int, float]) -> tuple[torch.Tensor, float]:
        """The float64 Σ wᵢ·(peft's merge of checkpoint i), and 8 float32 ulps of its largest term."""
        terms = [w * self.merged[step][name].double() for step, w in weights.items()]
        return sum(terms), 8 * EPS32 * max(float(t.abs().max()) for t in terms)

    def load_adapter(self, folder):
        from peft import PeftModel

        return quiet(PeftModel.from_pretrained, self.run.load_base(), folder)


_PREPARED: dict[str, Prepared] = {}


def prepared_run(tmp_path_factory, name: str) -> Prepared:
    if name not in _PREPARED:
        _PREPARED[name] = Prepared(lora_run(tmp_path_factory, name))
    return _PREPARED[name]


@pytest.mark.parametrize("name", ["dpo", "sft", "lora_bias", "gpt2"])
def test_lossless_adapter_equals_the_merged_average(tmp_path_factory, tmp_path, name):
    prepared = prepared_run(tmp_path_factory, name)
    report = write_adapter(tmp_path / "out", prepared.adapters, prepared.base, WEIGHTS, base_model="the-base")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert report.max_truncation_error is None
    assert all(rank == 3 * prepared.adapters.layout.modules[m + ".weight"].rank for m, rank in report.ranks.items())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["use_rslora"] is False and config["base_model_name_or_path"] == "the-base"
    assert config["alpha_pattern"] == config["rank_pattern"]

    adapter = prepared.load_adapter(tmp_path / "out")
    with torch.no_grad():
        adapter_logits = adapter(BATCH).logits
    merged = merged_state(adapter)
    ours = {t.name: t.value for t in iter_merged(prepared.adapters, prepared.base, WEIGHTS)}
    for tensor_name, value in ours.items():
        expected, tolerance = prepared.reference(tensor_name, WEIGHTS)
        assert float((merged[tensor_name].double() - expected).abs().max()) <= tolerance, tensor_name
    averaged_model = prepared.run.load_base()
    if prepared.adapters.layout.untied:
        averaged_model.config.tie_word_embeddings = False
        averaged_model.lm_head.weight = torch.nn.Parameter(averaged_model.lm_head.weight.detach().clone())
    missing, unexpected = averaged_model.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} - set(prepared.adapters.layout.untied)
    with torch.no_grad():
        assert float((adapter_logits - prepared.run.load_base()(BATCH).logits).abs().max()) > 1e-2  # the average moved
        assert torch.allclose(adapter_logits, averaged_model(BATCH).logits, rtol=1e-4, atol=1e-5)


def test_rank_patterns_in_the_output(tmp_path_factory, tmp_path):
    """The `sft` run's modules have ranks 2, 4 and 6: stacked 6, 12 and 18; truncated to 8, 6 stays 6."""
    prepared = prepared_run(tmp_path_factory, "sft")
    lossless = write_adapter(tmp_path / "lossless", prepared.adapters, prepared.base, WEIGHTS)
    assert sorted(set(lossless.ranks.values())) == [6, 12, 18]
    assert lossless.config["r"] == 12 and lossless.config["rank_pattern"]["model\\.layers\\.1\\.self_attn\\.o_proj"] == 18
    truncated = write_adapter(tmp_path / "rank8", prepared.adapters, prepared.base, WEIGHTS, rank=8)
    assert truncated.ranks["model.layers.0.self_attn.v_proj"] == 6 and truncated.ranks["model.layers.0.self_attn.q_proj"] == 8
    assert truncated.truncation_errors["model.layers.0.self_attn.v_proj"] == 0.0
    adapter = prepared.load_adapter(tmp_path / "rank8")  # peft builds every module at its pattern's rank
    layers = {name.removeprefix("base_model.model."): module for name, module in adapter.named_modules() if hasattr(module, "r")}
    assert {name: layer.r["default"] for name, layer in layers.items()} == truncated.ranks


def dense_exact_delta(prepared: Prepared, module, weights) -> torch.Tensor:
    """s·Σ wᵢBᵢAᵢ in float64 (peft's orientation, B @ A)."""
    with OpenFiles() as files:
        factors = {s: read_module_factors(module, prepared.adapters.checkpoints[s], files, torch.float64) for s in STEPS}
    return module.scaling * sum(weights[s] * factors[s].B @ factors[s].A for s in STEPS)


def adapter_delta(folder, module) -> torch.Tensor:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return f.get_tensor(module.lora_B).double() @ f.get_tensor(module.lora_A).double()


def test_full_rank_reproduces_the_lossless_output(tmp_path_factory, tmp_path):
    prepared = prepared_run(tmp_path_factory, "dpo")
    write_adapter(tmp_path / "lossless", prepared.adapters, prepared.base, WEIGHTS)
    report = write_adapter(tmp_path / "full", prepared.adapters, prepared.base, WEIGHTS, rank=12)
    assert set(report.truncation_errors.values()) == {0.0} and set(report.ranks.values()) == {12}
    for module in prepared.adapters.layout.modules.values():
        lossless, full = adapter_delta(tmp_path / "lossless", module), adapter_delta(tmp_path / "full", module)
        assert float((full - lossless).abs().max()) <= 32 * EPS32 * float(lossless.abs().max()), module.module


def test_a_lower_rank_reports_the_error_of_a_dense_svd(tmp_path_factory, tmp_path):
    prepared = prepared_run(tmp_path_factory, "gpt2")  # Conv1D modules and an embedding
    report = write_adapter(tmp_path / "out", prepared.adapters, prepared.base, WEIGHTS, rank=5)
    for module in prepared.adapters.layout.modules.values():
        delta = dense_exact_delta(prepared, module, WEIGHTS)
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        expected = float((sigma[5:] ** 2).sum().sqrt() / (sigma**2).sum().sqrt())
        assert report.truncation_errors[module.module] == pytest.approx(expected, rel=1e-9)
        assert expected > 1e-4  # the truncation drops something
        best = (u[:, :5] * sigma[:5]) @ vh[:5]
        written = adapter_delta(tmp_path / "out", module)
        assert float((written - best).abs().max()) <= 64 * EPS32 * float(best.abs().max()), module.module
    assert report.max_truncation_error == max(report.truncation_errors.values())


def test_truncate_never_exceeds_the_available_rank():
    torch.manual_seed(0)
    B, A = torch.randn(7, 6, dtype=torch.float64), torch.randn(6, 30, dtype=torch.float64)
    new_B, new_A, error = truncate(B, A, 50)
    assert new_B.shape == (7, 6) and new_A.shape == (6, 30) and error == 0.0
    assert torch.allclose(new_B @ new_A, B @ A, rtol=0, atol=1e-12)


def test_factors_mode_writes_the_averaged_factors(tmp_path_factory, tmp_path):
    prepared = prepared_run(tmp_path_factory, "dpo")
    report = write_adapter(tmp_path / "out", prepared.adapters, prepared.base, WEIGHTS, mode="factors")
    assert report.config["r"] == 4 and report.config["lora_alpha"] == 12  # the run's own rank and scaling
    merged = merged_state(prepared.load_adapter(tmp_path / "out"))
    for tensor in iter_merged(prepared.adapters, prepared.base, WEIGHTS, mode="factors"):
        if tensor.changed:
            scale = float(tensor.value.abs().max())
            assert float((merged[tensor.name] - tensor.value).abs().max()) <= 16 * EPS32 * scale, tensor.name


def test_weights_on_the_base_only(tmp_path_factory, tmp_path):
    """All weight on θ0: a rank-r adapter whose B is zero, and the base comes back."""
    prepared = prepared_run(tmp_path_factory, "dpo")
    weights = {0: 1.0}  # no checkpoint named: the factors still take a checkpoint's shape
    report = write_adapter(tmp_path / "out", prepared.adapters, prepared.base, weights)
    assert set(report.ranks.values()) == {4}
    merged = merged_state(prepared.load_adapter(tmp_path / "out"))
    assert all(torch.equal(merged[name], prepared.merged[0][name]) for name in prepared.adapters.layout.modules)


def test_bf16_output(tmp_path_factory, tmp_path):
    prepared = prepared_run(tmp_path_factory, "dpo")
    write_adapter(tmp_path / "out", prepared.adapters, prepared.base, WEIGHTS, dtype="BF16")
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    prepared.load_adapter(tmp_path / "out")


def test_dora_and_bad_options_are_refused_before_anything_is_written(tmp_path_factory, tmp_path):
    dora = prepared_run(tmp_path_factory, "dora")
    with pytest.raises(UsageError, match=r"is a DoRA adapter \(use_dora\), whose merged weight is not linear in its factors.*use --lora-output merged"):
        write_adapter(tmp_path / "out", dora.adapters, dora.base, WEIGHTS)
    dpo = prepared_run(tmp_path_factory, "dpo")
    with pytest.raises(UsageError, match="--lora-rank must be a positive integer, got 0"):
        write_adapter(tmp_path / "out", dpo.adapters, dpo.base, WEIGHTS, rank=0)
    with pytest.raises(UsageError, match="does not combine with --lora-average factors"):
        write_adapter(tmp_path / "out", dpo.adapters, dpo.base, WEIGHTS, rank=4, mode="factors")
    assert not (tmp_path / "out").exists()


def test_output_rank(tmp_path_factory):
    layout = prepared_run(tmp_path_factory, "gpt2").adapters.layout
    embedding = layout.modules["transformer.wte.weight"]  # B [32, r] @ A [r, 169]
    assert output_rank(embedding, WEIGHTS) == 12
    assert output_rank(embedding, WEIGHTS, rank=100) == 12 and output_rank(embedding, WEIGHTS, rank=7) == 7
    assert output_rank(embedding, {0: 0.5, 2: 0.0, 4: 0.0, 6: 0.5}) == 4
    assert output_rank(embedding, WEIGHTS, mode="factors") == 4
