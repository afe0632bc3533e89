"""Weighted-sum outputs (every method but TRL's replayed bema and ema): Σ wᵢ·θᵢ accumulated in float32 with the
float64 weights rounded once, the same bits on the kernel and on torch's ops, whatever the budget or the threads,
and a mixed sweep equal to its configs run one by one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import make_run

from bema_offline import BEMASchedule, average
from bema_offline.methods.expo import ExPO
from bema_offline.methods.posthoc import HalfLifeEMA, PowerEMA
from bema_offline.methods.replay import BEMA, EMA
from bema_offline.methods.stabilizers import DEMA, OUEMA
from bema_offline.methods.windows import WSM, Uniform
from bema_offline.output.verify import verify

STEPS = [2, 4, 6, 8, 10]
SCHEDULE = BEMASchedule(update_freq=2)
METHODS = {
    "uniform": Uniform(last=3),
    "uniform-all": Uniform(),
    "half-life": HalfLifeEMA(half_life=4.0),
    "power-ema": PowerEMA(sigma_rel=0.2),
    "wsm": WSM(decay="cosine", last=4),
    "expo": ExPO(alpha=0.5),
    "dema": DEMA(SCHEDULE),
    "ouema": OUEMA(SCHEDULE),
}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"weighted-{request.param}")
    run_dir, base_dir, weights = make_run(root, STEPS, dtype=request.param, extra={"position_ids": torch.arange(7)}, frozen=("model.norm.weight",))
    return run_dir, base_dir, weights, request.param


def _load(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32) if tensor.is_floating_point() else tensor


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_is_its_float64_weighted_sum_within_rounding(run, tmp_path, name):
    run_dir, base_dir, weights, dtype = run
    method = METHODS[name]
    result = average(run_dir, tmp_path / "out", schedule=method, base_model=base_dir)
    written = _load(tmp_path / "out")
    effective = result.outputs[0].weights
    assert effective == method.weights(STEPS, base=True) and abs(sum(effective.values()) - 1) < 1e-12
    for tensor, value in written.items():
        if tensor in ("position_ids", "model.norm.weight"):  # copied: non-float, and frozen
            assert torch.equal(value, weights[max(effective)][tensor]), tensor
            continue
        reference = sum(w * weights[step][tensor].double() for step, w in effective.items())
        scale = sum(abs(w) * weights[step][tensor].double().abs() for step, w in effective.items())
        # float32 accumulation: a few ulps of the terms' magnitudes, plus the output's own rounding
        tolerance = scale * (len(effective) + 2) * 2**-24 + reference.abs() * (2**-8 if dtype == torch.bfloat16 else 2**-24)
        assert ((value.double() - reference).abs() <= tolerance).all(), tensor


def test_uniform_is_the_mean_of_the_stack(run, tmp_path):
    run_dir, base_dir, weights, dtype = run
    average(run_dir, tmp_path / "out", schedule=Uniform(last=4), base_model=base_dir)
    written = _load(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    mean = torch.stack([weights[s][name].double() for s in STEPS[-4:]]).mean(0)
    assert torch.allclose(written[name].double(), mean, rtol=2**-7 if dtype == torch.bfloat16 else 2**-21, atol=1e-7)


def test_kernel_and_torch_ops_give_the_same_bits_at_any_budget_and_thread_count(run, tmp_path, monkeypatch):
    run_dir, base_dir, _, _ = run
    configs = [(name, method) for name, method in METHODS.items()]
    reference = None
    for kernel, budget, threads in [("1", "1GiB", 1), ("1", "4KiB", 2), ("0", "8KiB", 2), ("0", "1GiB", 1)]:
        monkeypatch.setenv("BEMA_OFFLINE_KERNEL", kernel)
        out = tmp_path / f"out-{kernel}-{budget}-{threads}"
        average(run_dir, out, schedule=configs, base_model=base_dir, max_memory=budget, threads=threads)
        found = {name: _load(out / name) for name, _ in configs}
        if reference is None:
            reference = found
            continue
        for name, tensors in found.items():
            for tensor, value in tensors.items():
                assert torch.equal(_bits(value), _bits(reference[name][tensor])), (kernel, budget, threads, name, tensor)


def test_a_mixed_sweep_equals_its_configs_run_one_by_one(run, tmp_path):
    """Replayed and weighted outputs in one pass over the run: every folder has the bytes of its config alone."""
    run_dir, base_dir, _, _ = run
    configs = [("bema", BEMA(SCHEDULE)), ("ema", EMA(SCHEDULE)), ("uniform", Uniform(last=3)), ("expo", ExPO(alpha=0.5)), ("dema", DEMA(SCHEDULE))]
    average(run_dir, tmp_path / "sweep", schedule=configs, base_model=base_dir, max_memory="16KiB")
    for name, method in configs:
        alone = tmp_path / f"alone-{name}"
        average(run_dir, alone, schedule=method, base_model=base_dir)
        for file in ("model.safetensors",):
            assert (tmp_path / "sweep" / name / file).read_bytes() == (alone / file).read_bytes(), name


def test_weighted_outputs_verify_and_recompute(run, tmp_path):
    run_dir, base_dir, _, _ = run
    configs = [("uniform", Uniform(last=3)), ("expo", ExPO(alpha=0.5)), ("bema", BEMA(SCHEDULE))]
    average(run_dir, tmp_path / "out", schedule=configs, base_model=base_dir)
    reports = verify(tmp_path / "out", recompute=10, seed=0)
    assert len(reports) == 3 and all(report.recomputed for report in reports)


def test_a_weighted_output_reads_only_its_sources(run, tmp_path):
    run_dir, base_dir, _, _ = run
    result = average(run_dir, tmp_path / "out", schedule=Uniform(last=2), base_model=base_dir, dry_run=True)
    assert result.plan.read_steps == [8, 10] and result.plan.ignored_steps == [2, 4, 6]
