"""The benchmark's inputs and baseline: synthetic runs load as HF checkpoints, and the naive baseline equals
`bema-average` bit for bit (only the time and the memory may differ)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bema_offline import BEMASchedule, average

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype, shards", [("bfloat16", 1), ("float32", 3)])
def test_synthetic_run_and_naive_baseline(tmp_path, dtype, shards):
    synthetic, naive = load_script("synthetic_run"), load_script("naive_baseline")
    run_dir, base_dir = synthetic.make_synthetic_run(tmp_path / "run", size=16 * 2**20, checkpoints=3, dtype=dtype, shards=shards, vocab=256)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-1200", "checkpoint-400", "checkpoint-800"]
    state = naive.load_state_dict(run_dir / "checkpoint-800")
    assert "model.layers.0.mlp.down_proj.weight" in state and all(t.dtype == getattr(torch, dtype) for t in state.values())
    assert 8 * 2**20 < sum(t.nbytes for t in state.values()) < 24 * 2**20  # coarse at tiny sizes: whole layers
    if shards > 1:
        index = json.loads((run_dir / "checkpoint-800" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == shards
    # reused when asked again with the same spec
    mtime = (base_dir / "config.json").stat().st_mtime_ns
    synthetic.make_synthetic_run(tmp_path / "run", size=16 * 2**20, checkpoints=3, dtype=dtype, shards=shards, vocab=256)
    assert (base_dir / "config.json").stat().st_mtime_ns == mtime

    bema = naive.naive_bema(run_dir, base_dir, update_freq=400, ema_power=0.5, bias_power=0.2, lag=10)
    average(run_dir, tmp_path / "out", schedule=BEMASchedule(), base_model=base_dir, max_shard_size="1GB")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    assert ours.keys() == bema.keys()
    assert all(torch.equal(ours[name], bema[name]) for name in ours)


def test_llama_shapes_hit_the_target_size():
    synthetic = load_script("synthetic_run")
    for target in (2**28, 2**30, 2**32):
        shapes = synthetic.llama_shapes(target, 2)
        size = 2 * sum(torch.Size(s).numel() for s in shapes.values())
        assert 0.85 * target < size < 1.15 * target
        assert sum(name.endswith("input_layernorm.weight") for name in shapes) >= 4


def test_synthetic_lora_run(tmp_path):
    """The LoRA benchmark's run: adapters that bema-offline reads as peft's, on every linear layer of the base, and a
    merged average equal to W0 + s·Σ wᵢ·Bᵢ·Aᵢ written out in float64."""
    from bema_offline.methods.windows import Uniform

    bench_lora = load_script("bench_lora")
    run_dir, base_dir = bench_lora.make_lora_run(tmp_path / "lora", size=4 * 2**20, checkpoints=3, rank=4, dtype="float32", vocab=64)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-1200", "checkpoint-400", "checkpoint-800"]
    result = average(run_dir, tmp_path / "out", schedule=Uniform())
    layout = result.plan.lora.run.layout
    assert {m.module.rpartition(".")[2] for m in layout.modules.values()} == set(bench_lora.TARGETS)
    assert all((m.rank, m.scaling) == (4, 2.0) for m in layout.modules.values())
    base, out = load_file(base_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    adapters = [load_file(run_dir / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (400, 800, 1200)]
    name = "model.layers.0.mlp.down_proj.weight"
    key = "base_model.model.model.layers.0.mlp.down_proj"
    delta = sum(a[f"{key}.lora_B.weight"].double() @ a[f"{key}.lora_A.weight"].double() for a in adapters) / 3
    expected = base[name].double() + 2.0 * delta
    assert float((out[name].double() - expected).abs().max()) <= 8 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"])
