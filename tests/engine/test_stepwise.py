"""The step-major engine gives the same bytes as `Engine`, for every kind of plan and budget, reading each step
once, in order, and releasing it before the next is fetched."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from safetensors.torch import save_file
from synthetic import make_run

from bema_offline import BEMASchedule
from bema_offline.dtypes import DTYPES
from bema_offline.engine.engine import Engine, Sink
from bema_offline.engine.plan import make_plan
from bema_offline.engine.stepwise import StepwiseEngine
from bema_offline.errors import DataError


class MemorySink(Sink):
    """Every output's bytes per tensor, written slice by slice (each slice exactly once)."""

    concurrent = True

    def __init__(self, plan) -> None:
        self.plan = plan
        self.data = [{t.name: bytearray(t.numel * DTYPES[plan.output_dtypes[t.name]].itemsize) for t in plan.tensors} for _ in plan.outputs]
        self.written = [{t.name: 0 for t in plan.tensors} for _ in plan.outputs]
        self.lock = threading.Lock()

    def write(self, output_index, piece, data) -> None:
        itemsize = DTYPES[self.plan.output_dtypes[piece.name]].itemsize
        assert data.nbytes == piece.numel * itemsize
        self.data[output_index][piece.name][piece.start * itemsize : piece.stop * itemsize] = data
        with self.lock:
            self.written[output_index][piece.name] += data.nbytes

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        return {
            name: torch.frombuffer(bytearray(raw), dtype=DTYPES[self.plan.output_dtypes[name]].torch) if raw else torch.empty(0)
            for name, raw in self.data[index].items()
        }


def run_both(plan, tmp_path, *, max_memory=2**20, threads=2, accum_dtype="float32", **kwargs):
    """Both engines' outputs, checking that the step-major one wrote every byte once and fetched in order."""
    reference = MemorySink(plan)
    Engine(plan, reference, max_memory=2**30, accum_dtype=accum_dtype).run()
    ours = MemorySink(plan)
    events = []
    StepwiseEngine(
        plan, ours, state_dir=tmp_path / "state", max_memory=max_memory, threads=threads, accum_dtype=accum_dtype,
        fetch=lambda step: events.append(("fetch", step)) or plan.sources[step], release=lambda step: events.append(("release", step)),
        **kwargs,
    ).run()
    assert events == [(what, step) for step in plan.read_steps for what in ("fetch", "release")]
    for index, written in enumerate(ours.written):
        for info in plan.tensors:
            assert written[info.name] == info.numel * DTYPES[plan.output_dtypes[info.name]].itemsize, (index, info.name)
    assert not (tmp_path / "state").exists()  # the state files and their folder are gone
    return reference, ours


def assert_same_bytes(reference: MemorySink, ours: MemorySink) -> None:
    for index, (expected, got) in enumerate(zip(reference.data, ours.data)):
        for name in expected:
            assert bytes(got[name]) == bytes(expected[name]), (index, name)


SCHEDULES = {
    "defaults": [("", BEMASchedule(update_freq=1))],
    "burn-in": [("", BEMASchedule(update_freq=2, update_after=2, lag=3, multiplier=2.0, min_ema_multiplier=0.25))],
    "sweep": [
        ("a", BEMASchedule(update_freq=1, ema_power=0.3)),
        ("b", BEMASchedule(update_freq=1, ema_power=0.5, bias_power=0.1)),
        ("c", BEMASchedule(update_freq=2, update_after=2)),
    ],
}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def run(request, tmp_path_factory):
    """A run with a frozen tensor, a non-float one, and tensors that stay unchanged for the first steps only."""
    dtype = getattr(torch, request.param)
    root = tmp_path_factory.mktemp(request.param)
    extra = {"position_ids": torch.arange(12, dtype=torch.int64).reshape(3, 4)}
    run_dir, base_dir, weights = make_run(root, [1, 2, 3, 4, 5, 6], dtype=dtype, frozen=("model.norm.weight",), extra=extra)
    # a tensor that first changes at step 3 (thaws mid-run), and one that only changes at the last step
    late = torch.randn(40, generator=torch.Generator().manual_seed(1)).to(dtype)
    for step in [0, 1, 2, 3, 4, 5, 6]:
        folder = base_dir if step == 0 else run_dir / f"checkpoint-{step}"
        tensors = dict(weights[step])
        tensors["late.weight"] = late if step < 3 else (late.float() + step).to(dtype)
        tensors["last.weight"] = late.clone() if step < 6 else -late
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return run_dir, base_dir


@pytest.mark.parametrize("schedules", list(SCHEDULES))
@pytest.mark.parametrize("budget", [4096, 2**20])
def test_same_bytes_as_engine(run, schedules, budget, tmp_path):
    run_dir, base_dir = run
    plan = make_plan(run_dir, SCHEDULES[schedules], base_model_dir=base_dir, save=("bema", "ema"), steps="every")
    reference, ours = run_both(plan, tmp_path, max_memory=budget, threads=1 if budget == 4096 else 2)
    assert_same_bytes(reference, ours)
    frozen = ours.tensors(len(plan.outputs) - 1)["model.norm.weight"]
    assert frozen.dtype in (torch.float32, torch.bfloat16)


def test_torch_ops_float64_accumulation_and_another_output_dtype(run, tmp_path, monkeypatch):
    run_dir, base_dir = run
    plan = make_plan(run_dir, SCHEDULES["burn-in"], base_model_dir=base_dir, save=("bema",), steps="every", dtype="float16")
    reference, ours = run_both(plan, tmp_path / "f64", accum_dtype="float64")
    assert_same_bytes(reference, ours)
    monkeypatch.setenv("BEMA_OFFLINE_KERNEL", "0")  # torch's ops where the kernel would run
    reference, ours = run_both(plan, tmp_path / "torch")
    assert_same_bytes(reference, ours)


def test_float16_inputs_go_on_torch_and_match(tmp_path):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6], dtype=torch.float16, frozen=("model.norm.weight",))
    plan = make_plan(run_dir, [("", BEMASchedule(update_freq=2))], base_model_dir=base_dir)
    assert_same_bytes(*run_both(plan, tmp_path))


def test_a_released_step_is_never_read_again(run, tmp_path):
    """Deleting each step's weights on release (as --no-keep-downloads does) changes nothing: the engine reads a
    step only between its fetch and its release."""
    run_dir, base_dir = run
    copy = tmp_path / "copy"
    for folder in [base_dir, *sorted(run_dir.iterdir())]:
        target = copy / folder.relative_to(run_dir.parent)
        target.mkdir(parents=True)
        for file in folder.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
    plan = make_plan(copy / "run", SCHEDULES["sweep"], base_model_dir=copy / "base", steps="every")
    reference = MemorySink(plan)
    Engine(plan, reference, max_memory=2**20).run()
    ours = MemorySink(plan)
    released = []

    def release(step):
        released.append(step)
        os.unlink(plan.sources[step].folder / "model.safetensors")

    StepwiseEngine(plan, ours, state_dir=tmp_path / "state", max_memory=8192, release=release).run()
    assert released == plan.read_steps
    assert_same_bytes(reference, ours)


def test_weighted_outputs_give_engine_s_bytes(run, tmp_path):
    """Weighted sums beside replays (a mixed sweep): `scale` at the first source, `accumulate` after, in step order,
    as `Engine` computes them."""
    from bema_offline.methods.expo import ExPO
    from bema_offline.methods.replay import BEMA
    from bema_offline.methods.windows import Uniform

    run_dir, base_dir = run
    configs = [("uniform", Uniform(last=2)), ("expo", ExPO(alpha=0.5)), ("bema", BEMA(BEMASchedule(update_freq=2)))]
    plan = make_plan(run_dir, configs, base_model_dir=base_dir)
    assert [out.replayed for out in plan.outputs] == [False, False, True]
    run_both(plan, tmp_path, max_memory=8192)


def test_a_nan_in_a_checkpoint_is_named(tmp_path):
    run_dir, base_dir, weights = make_run(tmp_path, [1, 2, 3])
    broken = dict(weights[2])
    broken["model.norm.weight"] = broken["model.norm.weight"].clone()
    broken["model.norm.weight"][3] = float("nan")
    save_file(broken, run_dir / "checkpoint-2" / "model.safetensors", metadata={"format": "pt"})
    plan = make_plan(run_dir, [("", BEMASchedule(update_freq=1))], base_model_dir=base_dir)
    with pytest.raises(DataError, match=r"tensor 'model.norm.weight' has NaN or Inf values at step 2"):
        StepwiseEngine(plan, MemorySink(plan), state_dir=tmp_path / "s", max_memory=2**20).run()
    assert not (tmp_path / "s").exists()
