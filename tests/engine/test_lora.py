"""The LoRA arithmetic against peft's own merge, on real adapter checkpoints written by TRL's trainers.

peft's `merge_and_unload()` of a checkpoint is that checkpoint's weights; an average with effective weights wᵢ is
the float64 Σ wᵢ·(merge of checkpoint i), the base being θ0. Every tensor of our output must equal it within fp32
rounding: the tolerance is a few float32 ulps of the largest value that enters the sum.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_lora import STEPS, lora_run

from bema_offline.engine import lora
from bema_offline.engine.lora import ModuleAverage, factor_difference, full_rows, iter_merged
from bema_offline.errors import UsageError
from bema_offline.files import OpenFiles
from bema_offline.methods.schedule import BEMASchedule, effective_weights
from bema_offline.sources.peft import load_adapter_run, read_module_factors
from bema_offline.sources.run import find_checkpoints, load_source

EPS32 = torch.finfo(torch.float32).eps
RUNS = ("dpo", "sft", "dora", "lora_bias", "gpt2", "gpt2_dora")


def peft_state(run, step: int) -> dict[str, torch.Tensor]:
    """peft's merge of one checkpoint into a fresh base: that checkpoint's full weights."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(run.load_base(), run.checkpoint(step)).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class Prepared:
    """A run with its adapter layout and peft's merge of every checkpoint (the base is step 0)."""

    def __init__(self, run):
        self.run = run
        self.base = load_source(run.base_dir, 0)
        self.adapters = load_adapter_run(find_checkpoints(run.run_dir), self.base)
        base_state = {name: t.detach().clone() for name, t in run.load_base().state_dict().items()}
        self.merged = {0: base_state, **{step: peft_state(run, step) for step in STEPS}}


_PREPARED: dict[str, Prepared] = {}


@pytest.fixture(scope="module", params=RUNS)
def prepared(request, tmp_path_factory) -> Prepared:
    if request.param not in _PREPARED:
        _PREPARED[request.param] = Prepared(lora_run(tmp_path_factory, request.param))
    return _PREPARED[request.param]


def reference(prepared: Prepared, name: str, weights: dict[int, float]) -> tuple[torch.Tensor, float]:
    """The float64 weighted sum of peft's merges for tensor `name`, and the tolerance: 8 float32 ulps of the
    largest |wᵢ·θᵢ| that enters it (each merge is itself rounded to float32)."""
    terms = [w * prepared.merged[step][name].double() for step, w in weights.items()]
    scale = max(float(t.abs().max()) for t in terms)
    return sum(terms), 8 * EPS32 * scale


def check_average(prepared: Prepared, weights: dict[int, float], **kwargs) -> int:
    """Assert every output tensor equals the reference; return how many tensors the adapter changed."""
    changed = 0
    names = set()
    for tensor in iter_merged(prepared.adapters, prepared.base, weights, **kwargs):
        expected, tolerance = reference(prepared, tensor.name, weights)
        error = float((tensor.value.double() - expected).abs().max())
        assert error <= tolerance, f"{tensor.name}: off by {error:.3g}, tolerance {tolerance:.3g}"
        changed += tensor.changed
        names.add(tensor.name)
    untouched = set(prepared.merged[0]) - names
    for name in untouched:  # only tied heads the base file omits, and unchanged by the adapter
        assert all(torch.equal(prepared.merged[step][name], prepared.merged[0][name]) for step in STEPS), name
    return changed


@pytest.mark.parametrize("step", STEPS)
def test_one_checkpoint_equals_peft_merge_and_unload(prepared, step):
    changed = check_average(prepared, {step: 1.0})
    layout = prepared.adapters.layout
    assert changed == len(layout.modules) + len(layout.lora_biases) + len(layout.full_tensors)


def test_schedule_outputs_equal_the_float64_sum_of_peft_merges(prepared):
    """BEMA and EMA at the last step, and a sweep's second config: weights include a negative one on the base."""
    for schedule in (BEMASchedule(update_freq=2), BEMASchedule(update_freq=2, ema_power=0.2, bias_power=0.4)):
        for kind in ("bema", "ema"):
            weights = effective_weights(schedule, list(STEPS), [STEPS[-1]], kind)[STEPS[-1]]
            assert math.isclose(sum(weights.values()), 1.0)
            check_average(prepared, weights)
    assert effective_weights(BEMASchedule(update_freq=2), list(STEPS), [STEPS[-1]])[STEPS[-1]][0] < 0


def test_update_after_a_saved_step(prepared):
    """θ0 a checkpoint (`--update-after 2`): no weight on the base, W0's coefficient is still 1."""
    schedule = BEMASchedule(update_freq=2, update_after=2)
    weights = effective_weights(schedule, [4, 6], [6])[6]
    assert set(weights) == {2, 4, 6}
    check_average(prepared, weights)


@pytest.fixture(scope="module")
def dpo(tmp_path_factory) -> Prepared:
    if "dpo" not in _PREPARED:
        _PREPARED["dpo"] = Prepared(lora_run(tmp_path_factory, "dpo"))
    return _PREPARED["dpo"]


WEIGHTS = {0: -0.25, 2: 0.5, 4: -0.15, 6: 0.9}


def test_against_a_plain_float64_formula(dpo):
    """W0 + s·Σ wᵢ·Bᵢ·Aᵢ written out in float64 from safetensors' own reader, beside peft."""
    base = load_file(dpo.run.base_dir / "model.safetensors")
    adapters = {step: load_file(dpo.run.checkpoint(step) / "adapter_model.safetensors") for step in STEPS}
    out = {t.name: t.value for t in iter_merged(dpo.adapters, dpo.base, WEIGHTS)}
    for name, module in dpo.adapters.layout.modules.items():
        prefix = f"base_model.model.{module.module}"
        delta = sum(WEIGHTS[s] * adapters[s][f"{prefix}.lora_B.weight"].double() @ adapters[s][f"{prefix}.lora_A.weight"].double() for s in STEPS)
        expected = base[name].double() + 3.0 * delta  # lora_alpha 12 / r 4
        assert float((out[name].double() - expected).abs().max()) <= 4 * EPS32 * float(expected.abs().max()), name


def test_result_does_not_depend_on_the_block_size(prepared, monkeypatch):
    """Tiles of 8 rows: blocks of 3, 8 and 13 rows give the same bits (a float32 matmul's sum order depends on its
    shape, so the product is always computed in whole tiles aligned to row 0)."""
    monkeypatch.setattr(lora, "TILE_ROWS", 8)
    results = [{t.name: t.value for t in iter_merged(prepared.adapters, prepared.base, WEIGHTS, block_rows=rows)} for rows in (3, 8, 13)]
    for other in results[1:]:
        assert all(torch.equal(results[0][name], other[name]) for name in results[0])


def test_float64_accumulation(dpo):
    out = {t.name: t.value for t in iter_merged(dpo.adapters, dpo.base, WEIGHTS, dtype=torch.float64)}
    for name in dpo.adapters.layout.modules:
        assert out[name].dtype == torch.float64
        expected, tolerance = reference(dpo, name, WEIGHTS)
        assert float((out[name] - expected).abs().max()) <= tolerance


def dense_deltas(prepared: Prepared, module, weights):
    """Δ_exact = s·Σ wᵢBᵢAᵢ and Δ_factors = s·(Σ wᵢBᵢ)(Σ wᵢAᵢ), dense, float64, in the stored orientation."""
    with OpenFiles() as files:
        factors = {s: read_module_factors(module, prepared.adapters.checkpoints[s], files, torch.float64) for s in STEPS}
    exact = module.scaling * sum(weights[s] * factors[s].B @ factors[s].A for s in STEPS)
    averaged = module.scaling * sum(weights[s] * factors[s].B for s in STEPS) @ sum(weights[s] * factors[s].A for s in STEPS)
    if module.transposed:
        exact, averaged = exact.t(), averaged.t()
    return factors, exact, averaged


def test_factors_mode_and_its_difference_from_the_exact_average(dpo):
    base = load_file(dpo.run.base_dir / "model.safetensors")
    out = {t.name: t.value for t in iter_merged(dpo.adapters, dpo.base, WEIGHTS, mode="factors")}
    differences = []
    for name, module in dpo.adapters.layout.modules.items():
        factors, exact, averaged = dense_deltas(dpo, module, WEIGHTS)
        expected = base[name].double() + averaged
        assert float((out[name].double() - expected).abs().max()) <= 4 * EPS32 * float(expected.abs().max()), name
        dense = float(torch.linalg.matrix_norm(averaged - exact) / torch.linalg.matrix_norm(exact))
        measured = factor_difference(module, factors, WEIGHTS)
        assert measured == pytest.approx(dense, rel=1e-9, abs=1e-12)
        differences.append(measured)
    assert min(differences) > 1e-3  # averaging the factors is not the average: the difference is real


def test_factor_difference_is_zero_for_one_checkpoint(dpo):
    module = next(iter(dpo.adapters.layout.modules.values()))
    factors, _, _ = dense_deltas(dpo, module, WEIGHTS)
    assert factor_difference(module, {6: factors[6]}, {6: 1.0}) == pytest.approx(0.0, abs=1e-7)


def test_dora_refuses_factors_mode(tmp_path_factory):
    dora = _PREPARED.get("dora") or Prepared(lora_run(tmp_path_factory, "dora"))
    _PREPARED["dora"] = dora
    module = next(iter(dora.adapters.layout.modules.values()))
    assert module.magnitude is not None
    with OpenFiles() as files:
        factors = {s: read_module_factors(module, dora.adapters.checkpoints[s], files, torch.float32) for s in STEPS}
    with pytest.raises(UsageError, match="does not apply to DoRA"):
        ModuleAverage(module, factors, WEIGHTS, mode="factors")


def test_transposed_dora_needs_the_whole_tensor(tmp_path_factory):
    gpt2 = _PREPARED.get("gpt2_dora") or Prepared(lora_run(tmp_path_factory, "gpt2_dora"))
    _PREPARED["gpt2_dora"] = gpt2
    modules = gpt2.adapters.layout.modules
    assert {m.module for m in modules.values() if not m.rows_independent} == set(m.module for m in modules.values())
    module = modules["transformer.wte.weight"]
    assert module.embedding and module.transposed
    with OpenFiles() as files:
        factors = {s: read_module_factors(module, gpt2.adapters.checkpoints[s], files, torch.float32) for s in STEPS}
    with pytest.raises(ValueError, match="whole tensor"):
        ModuleAverage(module, factors, WEIGHTS).rows(torch.zeros(3, module.shape[1]), 0)


def test_weights_must_sum_to_one(dpo):
    module = next(iter(dpo.adapters.layout.modules.values()))
    with OpenFiles() as files:
        factors = {s: read_module_factors(module, dpo.adapters.checkpoints[s], files, torch.float32) for s in STEPS}
    with pytest.raises(ValueError, match="sum to 1"):
        ModuleAverage(module, factors, {2: 0.5, 4: 0.4})
    with pytest.raises(ValueError, match="no factors for steps"):
        ModuleAverage(module, factors, {8: 1.0})


def test_full_rows_is_the_weighted_sum():
    theta0, copies = torch.randn(5, 3), {2: torch.randn(5, 3), 4: torch.randn(5, 3)}
    weights = {0: -0.2, 2: 0.5, 4: 0.7}
    expected = -0.2 * theta0.double() + 0.5 * copies[2].double() + 0.7 * copies[4].double()
    assert torch.allclose(full_rows(theta0, copies, weights).double(), expected, rtol=0, atol=8 * EPS32 * 3)


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=["q_proj", "lm_head"]),
        dict(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True),  # peft ties the head's LoRA to the embedding's
        dict(target_modules=["q_proj", "embed_tokens"]),
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),  # saves both, tied
    ],
    ids=["lora-head", "lora-head-tied", "lora-embedding", "saved-embedding", "saved-head-tied"],
)
def test_tied_embeddings_changed_on_one_side_are_untied(tmp_path_factory, tmp_path, options):
    """A tied model whose adapter changes the head or the input embedding: the output writes `lm_head.weight`
    apart, and its logits are the adapter model's. (peft's merge_and_unload adds a head's delta to the shared
    tensor, changing the embedding too; the adapter's own forward pass does not, and it is the reference here.)"""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2ForCausalLM

    dpo = lora_run(tmp_path_factory, "dpo")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(dpo.load_base(), LoraConfig(r=2, lora_alpha=3, **options))
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data += 0.05 * torch.randn_like(parameter)  # as if trained
        model.save_pretrained(tmp_path / "run" / "checkpoint-1")
    base = load_source(dpo.base_dir, 0)
    run = load_adapter_run(find_checkpoints(tmp_path / "run"), base)
    assert run.layout.untied == {"lm_head.weight": "model.embed_tokens.weight"}
    state = {t.name: t.value for t in iter_merged(run, base, {1: 1.0})}
    untied = Qwen2ForCausalLM.from_pretrained(dpo.base_dir, dtype=torch.float32, tie_word_embeddings=False)
    missing, unexpected = untied.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = PeftModel.from_pretrained(dpo.load_base(), tmp_path / "run" / "checkpoint-1")
    batch = torch.tensor([[2, 10, 20, 30, 40, 3]])
    with torch.no_grad():
        expected = adapter(batch).logits
        assert float((expected - dpo.load_base()(batch).logits).abs().max()) > 0.1  # the adapter changes the logits
        assert torch.allclose(untied(batch).logits, expected, rtol=1e-5, atol=1e-5)
