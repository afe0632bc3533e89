"""The LoRA engine runs `engine/lora.py` over a whole plan: its outputs are the reference driver's (`iter_merged`) bit
for bit on every kind of run, and do not depend on `--max-memory` or `--threads`."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_lora import STEPS, assert_equals_peft, lora_run, wide_lora_run

from bema_offline.dtypes import DTYPES
from bema_offline.engine.engine import Sink
from bema_offline.engine.lora import TILE_ROWS, iter_merged
from bema_offline.engine.lora_engine import LoraEngine
from bema_offline.engine.plan import make_plan
from bema_offline.errors import UsageError
from bema_offline.methods.schedule import BEMASchedule
from bema_offline.methods.windows import Uniform

CONFIGS = [("bema", BEMASchedule(update_freq=2)), ("uniform", Uniform(last=2))]


class MemorySink(Sink):
    """Every output's tensors, assembled from the slices the engine writes (each element written once)."""

    def __init__(self, plan):
        self.plan = plan
        self.data = [{info.name: bytearray(info.numel * DTYPES[plan.output_dtypes[info.name]].itemsize) for info in plan.tensors} for _ in plan.outputs]
        self.written = [dict.fromkeys(plan.output_dtypes, 0) for _ in plan.outputs]

    def write(self, output_index, piece, data):
        itemsize = DTYPES[self.plan.output_dtypes[piece.name]].itemsize
        self.data[output_index][piece.name][piece.start * itemsize : piece.stop * itemsize] = data
        self.written[output_index][piece.name] += piece.numel

    def tensors(self, output_index) -> dict[str, torch.Tensor]:
        out = {}
        for info in self.plan.tensors:
            assert self.written[output_index][info.name] == info.numel, info.name
            dtype = DTYPES[self.plan.output_dtypes[info.name]].torch
            out[info.name] = torch.frombuffer(self.data[output_index][info.name], dtype=dtype).reshape(info.shape) if info.numel else torch.empty(info.shape, dtype=dtype)
        return out


def run_engine(plan, **options) -> list[dict[str, torch.Tensor]]:
    sink = MemorySink(plan)
    LoraEngine(plan, sink, **{"max_memory": 512 * 2**20, **options}).run()
    return [sink.tensors(index) for index in range(len(plan.outputs))]


@pytest.mark.parametrize("name", ["dpo", "sft", "dora", "lora_bias", "gpt2", "gpt2_dora"])
def test_the_engine_gives_the_reference_driver_s_bits(tmp_path_factory, name):
    """Two configs in one pass, each equal to `iter_merged` with its weights, cast to the output dtype."""
    run = lora_run(tmp_path_factory, name)
    plan = make_plan(run.run_dir, CONFIGS, base_model_dir=run.base_dir)
    outputs = run_engine(plan)
    for spec, tensors in zip(plan.outputs, outputs):
        reference = {t.name: t.value.to(tensors[t.name].dtype) for t in iter_merged(plan.lora.run, plan.lora.base, spec.weights)}
        assert reference.keys() == tensors.keys()
        for tensor_name, value in tensors.items():
            assert torch.equal(value, reference[tensor_name]), (spec.config, tensor_name)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return wide_lora_run(tmp_path_factory)


def test_bits_do_not_depend_on_the_budget_or_the_threads(wide):
    """Blocks of one tile (a budget just above the largest task's minimum) on one worker, and one block per tensor on
    two: the same bytes, equal to the float64 sum of peft's merges."""
    plan = make_plan(wide.run_dir, CONFIGS, base_model_dir=wide.base_dir)
    roomy = LoraEngine(plan, MemorySink(plan), max_memory=512 * 2**20, threads=2)
    tight_budget = max(task.minimum for task in roomy.tasks) + 2**10
    tight = LoraEngine(plan, MemorySink(plan), max_memory=tight_budget, threads=1)
    up = next(task for task in tight.tasks if task.name.endswith("mlp.up_proj.weight"))
    assert up.rows > 2 * TILE_ROWS and up.block_rows(tight.budget) == TILE_ROWS and up.block_rows(roomy.budget) >= up.rows
    embedding = next(task for task in tight.tasks if task.kind == "full")
    assert embedding.block_rows(tight.budget) < embedding.rows
    first = run_engine(plan, threads=2)
    for options in (dict(max_memory=tight_budget, threads=1), dict(max_memory=3 * tight_budget, threads=3)):
        again = run_engine(plan, **options)
        for ours, theirs in zip(first, again):
            assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    for spec, tensors in zip(plan.outputs, first):
        assert_equals_peft(wide, tensors, spec.weights)


def test_fewer_workers_when_the_budget_holds_one_task_only(wide):
    plan = make_plan(wide.run_dir, CONFIGS, base_model_dir=wide.base_dir)
    largest = max(LoraEngine(plan, MemorySink(plan), max_memory=2**30).tasks, key=lambda task: task.minimum).minimum
    assert LoraEngine(plan, MemorySink(plan), max_memory=largest + 100, threads=4).threads == 1
    with pytest.raises(UsageError, match=rf"--max-memory {largest - 1} bytes is too small for tensor .*; give at least {math.ceil(largest / 2**20)} MiB"):
        LoraEngine(plan, MemorySink(plan), max_memory=largest - 1)


def test_only_plans_of_lora_runs(tmp_path):
    from synthetic import make_run

    run_dir, base_dir, _ = make_run(tmp_path, list(STEPS))
    plan = make_plan(run_dir, CONFIGS[:1], base_model_dir=base_dir)
    with pytest.raises(ValueError, match="LoRA runs only"):
        LoraEngine(plan, MemorySink(plan), max_memory=2**20)
