"""The benchmark's layouts (`scripts/layout_runs.py`) hold the very weights of the safetensors run they rewrite: each
averages to the same bits, and the ZeRO-3 layout is one DeepSpeed's own `zero_to_fp32` reads."""

from __future__ import annotations

import importlib.util
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


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts") / "safetensors"
    load_script("synthetic_run").make_synthetic_run(root, size=2 * 2**20, checkpoints=2, dtype="float32", vocab=64)
    return root


@pytest.mark.parametrize("layout", ["bin", "dcp", "zero3"])
def test_each_layout_averages_as_the_safetensors_run(synthetic_run, tmp_path, layout):
    load_script("layout_runs").convert(synthetic_run, tmp_path / layout, layout)
    expected = average(synthetic_run / "run", tmp_path / "expected", schedule=BEMASchedule(), base_model=synthetic_run / "base")
    result = average(tmp_path / layout / "run", tmp_path / "out", schedule=BEMASchedule(), base_model=tmp_path / layout / "base")
    assert result.plan.sources[800].layout != "safetensors"
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(expected.outputs[0].path / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_the_zero3_layout_is_one_deepspeed_reads(synthetic_run, tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    load_script("layout_runs").convert(synthetic_run, tmp_path / "zero3", "zero3")
    rebuilt = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "zero3" / "run" / "checkpoint-800"))
    saved = load_file(synthetic_run / "run" / "checkpoint-800" / "model.safetensors")
    assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[name], saved[name]) for name in saved)
