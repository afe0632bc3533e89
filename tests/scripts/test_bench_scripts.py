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
