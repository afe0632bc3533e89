"""The streaming engine against independent references: TRL's ops replayed on whole tensors, and float64."""

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from synthetic import make_run

from bema_offline import BEMASchedule, DataError, UsageError, average
from bema_offline.engine import kernels
from bema_offline.engine.engine import group_slices


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def trl_replay(weights, schedule, update_steps, out_step, dtype=torch.float32):
    """TRL's BEMACallback ops, on whole tensors, in `dtype`."""
    theta0 = {k: v.to(dtype).clone() for k, v in weights[schedule.theta0_step].items()}
    ema = {k: v.clone() for k, v in theta0.items()}
    for step in update_steps:
        if step > out_step:
            break
        beta = schedule.beta(step)
        for k in ema:
            ema[k].mul_(1 - beta).add_(weights[step][k].to(dtype), alpha=beta)
    alpha = schedule.alpha(out_step)
    return {k: ema[k] + alpha * (weights[out_step][k].to(dtype) - theta0[k]) for k in ema}


def float64_reference(weights, schedule, update_steps, out_step, kind="bema"):
    """The plain recurrence in float64."""
    theta0 = {k: v.double() for k, v in weights[schedule.theta0_step].items()}
    ema = dict(theta0)
    for step in update_steps:
        if step > out_step:
            break
        beta = schedule.beta(step)
        ema = {k: (1 - beta) * ema[k] + beta * weights[step][k].double() for k in ema}
    if kind == "ema":
        return ema
    alpha = schedule.alpha(out_step)
    return {k: ema[k] + alpha * (weights[out_step][k].double() - theta0[k]) for k in ema}


schedules = st.builds(
    BEMASchedule,
    update_freq=st.integers(1, 3),
    ema_power=st.floats(0, 1.5),
    bias_power=st.floats(0, 1),
    lag=st.floats(1, 20),
    update_after=st.integers(0, 3),
    multiplier=st.floats(0.2, 3),
    min_ema_multiplier=st.sampled_from([0.0, 0.0, 0.2, 0.45]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules, n_steps=st.integers(7, 10), shards=st.integers(1, 3), budget=st.integers(4096, 6000), seed=st.integers(0, 2**16))
def test_tiny_budget_is_bit_identical_and_matches_references(schedule, n_steps, shards, budget, seed):
    steps = list(range(1, n_steps + 1))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, base_dir, weights = make_run(Path(tmp), steps, shards=shards, seed=seed)
        update_steps = schedule.update_steps(steps)
        big = average(run_dir, Path(tmp) / "big", schedule=schedule, base_model=base_dir, max_memory="1GiB")
        small = average(run_dir, Path(tmp) / "small", schedule=schedule, base_model=base_dir, max_memory=budget)
        out_step = big.outputs[0].step
        assert out_step == update_steps[-1]
        assert len(group_slices(small.plan, max_memory=budget, accum_dtype="float32")) > 1
        big_t, small_t = load_output(Path(tmp) / "big"), load_output(Path(tmp) / "small")
        trl = trl_replay(weights, schedule, update_steps, out_step)
        ref64 = float64_reference(weights, schedule, update_steps, out_step)
        assert big_t.keys() == small_t.keys() == trl.keys()
        for name in big_t:
            assert torch.equal(big_t[name], small_t[name]), name
            assert torch.equal(big_t[name], trl[name]), name
            scale = max(1.0, float(ref64[name].abs().max()))
            assert torch.allclose(big_t[name].double(), ref64[name], rtol=0, atol=64 * 2**-24 * scale * len(update_steps)), name


def test_bf16_inputs_accumulate_in_fp32_closer_to_float64_than_bf16_buffers(tmp_path):
    steps = list(range(1, 9))
    run_dir, base_dir, weights = make_run(tmp_path, steps, dtype=torch.bfloat16)
    schedule = BEMASchedule(update_freq=1)
    average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir)
    out = load_output(tmp_path / "out")
    ref64 = float64_reference(weights, schedule, steps, 8)
    trl_bf16 = trl_replay(weights, schedule, steps, 8, dtype=torch.bfloat16)
    ours_err = sum(float((out[k].double() - ref64[k]).abs().sum()) for k in out)
    bf16_err = sum(float((trl_bf16[k].double() - ref64[k]).abs().sum()) for k in out)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert ours_err < bf16_err
    # and exactly the fp32 replay rounded to bf16
    trl32 = trl_replay(weights, schedule, steps, 8, dtype=torch.float32)
    assert all(torch.equal(out[k], trl32[k].to(torch.bfloat16)) for k in out)


def test_float64_accumulation_and_output_dtype(tmp_path):
    steps = [1, 2, 3]
    run_dir, base_dir, weights = make_run(tmp_path, steps)
    schedule = BEMASchedule(update_freq=1)
    average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir, accum_dtype="float64", dtype="bfloat16")
    out = load_output(tmp_path / "out")
    ref64 = float64_reference(weights, schedule, steps, 3)
    assert all(torch.equal(out[k], ref64[k].to(torch.bfloat16)) for k in out)


def test_ema_output_and_every_update(tmp_path):
    steps = [2, 4, 6]
    run_dir, base_dir, weights = make_run(tmp_path, steps)
    schedule = BEMASchedule(update_freq=2)
    result = average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir, save=("ema", "bema"), steps="every")
    assert sorted(str(o.path.relative_to(tmp_path / "out")) for o in result.outputs) == sorted(
        f"{kind}/step-{s}" for kind in ("ema", "bema") for s in steps
    )
    for step in steps:
        ema = load_output(tmp_path / "out" / "ema" / f"step-{step}")
        ref = float64_reference(weights, schedule, steps, step, kind="ema")
        for k in ema:
            assert torch.allclose(ema[k].double(), ref[k], atol=1e-6)
        bema = load_output(tmp_path / "out" / "bema" / f"step-{step}")
        trl = trl_replay(weights, schedule, steps, step)
        assert all(torch.equal(bema[k], trl[k]) for k in bema)


def test_frozen_and_non_float_tensors_are_copied_unchanged(tmp_path):
    steps = [1, 2, 3, 4]
    counter = torch.arange(7, dtype=torch.int64)
    run_dir, base_dir, weights = make_run(tmp_path, steps, extra={"position_ids": counter}, frozen=("model.norm.weight",))
    average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=1, ema_power=0.3), base_model=base_dir)
    out = load_output(tmp_path / "out")
    assert torch.equal(out["position_ids"], counter)
    assert torch.equal(out["model.norm.weight"], weights[0]["model.norm.weight"])
    assert not torch.equal(out["model.embed_tokens.weight"], weights[4]["model.embed_tokens.weight"])


def test_sweep_of_schedules_in_one_pass_equals_separate_runs(tmp_path):
    steps = [1, 2, 3, 4, 5, 6]
    run_dir, base_dir, _ = make_run(tmp_path, steps)
    configs = [("a", BEMASchedule(update_freq=1)), ("b", BEMASchedule(update_freq=2, update_after=2, ema_power=0.3))]
    together = average(run_dir, tmp_path / "sweep", schedule=configs, base_model=base_dir)
    assert [o.path.name for o in together.outputs] == ["a", "b"]
    for name, schedule in configs:
        average(run_dir, tmp_path / name, schedule=schedule, base_model=base_dir)
        one, swept = load_output(tmp_path / name), load_output(tmp_path / "sweep" / name)
        assert all(torch.equal(one[k], swept[k]) for k in one)


@pytest.mark.parametrize("budget", [4096, 100_000, 2**30])
def test_groups_fit_the_budget(tmp_path, budget):
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2])
    result = average(run_dir, tmp_path / "o", schedule=BEMASchedule(update_freq=1), base_model=base_dir, dry_run=True)
    groups = group_slices(result.plan, max_memory=budget, accum_dtype="float32")
    per_element = 4 + 4 * 2  # read buffer + θ0 + one EMA, fp32
    for group in groups:
        assert sum(p.numel for p in group) * per_element <= budget
    covered = {}
    for group in groups:
        for p in group:
            covered.setdefault(p.name, []).append((p.start, p.stop))
    for info in result.plan.tensors:
        ranges = sorted(covered[info.name])
        assert ranges[0][0] == 0 and ranges[-1][1] == info.numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("threads", [2, 3])
def test_workers_do_not_change_a_bit(tmp_path, threads):
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3, 4], shards=2, extra={"position_ids": torch.arange(9)})
    schedule = BEMASchedule(update_freq=1)
    kwargs = dict(schedule=schedule, base_model=base_dir, max_memory=20_000, save=("ema", "bema"))
    average(run_dir, tmp_path / "one", threads=1, **kwargs)
    average(run_dir, tmp_path / "many", threads=threads, **kwargs)
    for kind in ("ema", "bema"):
        assert folder_bytes(tmp_path / "one" / kind) == folder_bytes(tmp_path / "many" / kind)


def test_sweep_state_fits_the_budget_with_smaller_groups(tmp_path):
    from bema_offline.engine.engine import Engine, Sink

    run_dir, base_dir, _ = make_run(tmp_path, [1, 2])
    one = average(run_dir, tmp_path / "o", schedule=BEMASchedule(update_freq=1), base_model=base_dir, dry_run=True).plan
    configs = [(f"c{i}", BEMASchedule(update_freq=1, ema_power=0.1 * i, update_after=i % 2)) for i in range(8)]
    eight = average(run_dir, tmp_path / "o", schedule=configs, base_model=base_dir, dry_run=True).plan
    budget = 12_000
    largest = {}
    for name, plan in (("one", one), ("eight", eight)):
        engine = Engine(plan, Sink(), max_memory=budget, threads=2)
        assert engine.arena_bytes * engine.threads <= budget
        largest[name] = max(sum(p.numel for p in group) for group in engine.groups)
    assert largest["eight"] * 2 < largest["one"] < 400  # 2 θ0 + 8 EMAs instead of 1 + 1; 400: the largest tensor


def test_budget_too_small_for_a_sweep_says_so(tmp_path):
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2])
    configs = [(f"c{i}", BEMASchedule(update_freq=1, lag=1 + i)) for i in range(64)]
    with pytest.raises(UsageError, match="too small for 64 configs; give at least"):
        average(run_dir, tmp_path / "o", schedule=configs, base_model=base_dir, max_memory=4096)


def test_mixed_dtypes_in_one_group_and_a_wider_base(tmp_path):
    """bf16 and fp32 tensors of odd sizes share groups under --dtype float32; the base model is fp32."""
    shapes = {"a.weight": (7, 3), "b.weight": (5,), "c.weight": (3, 3)}
    run_dir, base_dir, weights = make_run(tmp_path, [1, 2, 3], shapes=shapes, dtype=torch.bfloat16)
    from synthetic import save_weights

    for step in (0, 1, 2, 3):
        weights[step]["b.weight"] = weights[step]["b.weight"].float() + step * 1e-3
        folder = base_dir if step == 0 else run_dir / f"checkpoint-{step}"
        tensors = weights[step] if step else {k: v.float() for k, v in weights[0].items()}
        save_weights(folder, tensors)
    weights[0] = {k: v.float() for k, v in weights[0].items()}
    schedule = BEMASchedule(update_freq=1)
    for budget in ("1GiB", 4096):
        average(run_dir, tmp_path / f"out-{budget}", schedule=schedule, base_model=base_dir, dtype="float32", max_memory=budget, threads=1)
        out = load_output(tmp_path / f"out-{budget}")
        trl = trl_replay(weights, schedule, [1, 2, 3], 3)
        assert all(out[k].dtype == torch.float32 and torch.equal(out[k], trl[k]) for k in trl)


class CollectingSink:
    """Every output tensor's bytes, whatever slices they came in."""

    def __init__(self):
        self.pieces = {}

    def write(self, output_index, piece, data):
        self.pieces.setdefault((output_index, piece.name), {})[piece.start] = bytes(data)

    @property
    def tensors(self) -> dict[tuple[int, str], bytes]:
        return {key: b"".join(parts[start] for start in sorted(parts)) for key, parts in self.pieces.items()}


def test_gpu_path_plumbing_on_the_cpu(tmp_path):
    """What --device cuda does (state in a device arena, bytes copied over, outputs copied back), run on the CPU:
    same bits. The GPU's own arithmetic is not checked here (no GPU)."""
    from bema_offline.engine.engine import Engine

    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3, 4], extra={"position_ids": torch.arange(9)})
    configs = [("a", BEMASchedule(update_freq=1)), ("b", BEMASchedule(update_freq=2, update_after=2))]
    plan = average(run_dir, tmp_path / "o", schedule=configs, base_model=base_dir, save=("ema", "bema"), dry_run=True).plan
    plain, staged = CollectingSink(), CollectingSink()
    Engine(plan, plain, max_memory=6000, threads=1).run()
    engine = Engine(plan, staged, max_memory=6000, threads=1, fused=False)  # as a GPU engine is
    engine.staged = True
    engine.run()
    assert plain.tensors == staged.tensors and len(plain.tensors) > 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clean_error(tmp_path):
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2])
    with pytest.raises(UsageError, match=r"--device cuda: torch sees no CUDA GPU here .*use --device cpu"):
        average(run_dir, tmp_path / "o", schedule=BEMASchedule(update_freq=1), base_model=base_dir, device="cuda")
    assert not (tmp_path / "o").exists()


def test_configs_differing_only_in_bias_power_share_one_ema(tmp_path):
    from bema_offline.engine.program import ema_slots

    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3, 4])
    configs = [(f"{e}-{b}", BEMASchedule(update_freq=1, ema_power=e, bias_power=b)) for e in (0.3, 0.5) for b in (0.1, 0.2)]
    configs.append(("late", BEMASchedule(update_freq=1, ema_power=0.3, update_after=2)))
    plan = average(run_dir, tmp_path / "o", schedule=configs, base_model=base_dir, dry_run=True).plan
    assert ema_slots(plan) == [0, 0, 1, 1, 2]
    average(run_dir, tmp_path / "sweep", schedule=configs, base_model=base_dir, save=("ema", "bema"), steps="every")
    for name, schedule in configs:
        average(run_dir, tmp_path / name, schedule=schedule, base_model=base_dir, save=("ema", "bema"), steps="every")
        for sub in (tmp_path / name).rglob("model.safetensors"):
            assert sub.read_bytes() == (tmp_path / "sweep" / name / sub.relative_to(tmp_path / name)).read_bytes()


def test_checkpoints_after_the_last_output_are_not_read(tmp_path):
    run_dir, base_dir, weights = make_run(tmp_path, [1, 2, 3, 4, 5, 6])
    schedule = BEMASchedule(update_freq=1)
    result = average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir, steps=[2, 4])
    assert result.plan.read_steps == [0, 1, 2, 3, 4]
    for step in (2, 4):
        out = load_output(tmp_path / "out" / f"step-{step}")
        trl = trl_replay(weights, schedule, [1, 2, 3, 4, 5, 6], step)
        assert all(torch.equal(out[k], trl[k]) for k in trl)


@pytest.mark.skipif(kernels._kernel is None, reason="the C kernel was not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fused_kernel_and_torch_ops_give_the_same_bits(tmp_path, dtype):
    """The whole engine with the C kernel (where it applies) and with torch's ops only: a sweep of four EMAs, one
    of them starting late, a frozen tensor and a non-float one."""
    from bema_offline.engine.engine import Engine

    run_dir, base_dir, _ = make_run(
        tmp_path, [1, 2, 3, 4, 5, 6], dtype=dtype, shards=2, frozen=("model.norm.weight",), extra={"position_ids": torch.arange(9)}
    )
    configs = [
        (f"c{i}", BEMASchedule(update_freq=1, ema_power=power, update_after=after))
        for i, (power, after) in enumerate([(0.3, 0), (0.5, 0), (0.5, 2), (0.9, 0)])
    ]
    plan = average(run_dir, tmp_path / "o", schedule=configs, base_model=base_dir, save=("ema", "bema"), steps="every", dry_run=True).plan
    fused, plain = CollectingSink(), CollectingSink()
    Engine(plan, fused, max_memory=20_000, threads=2).run()
    Engine(plan, plain, max_memory=20_000, threads=2, fused=False).run()
    assert fused.tensors == plain.tensors and len(fused.tensors) > 100


@pytest.mark.parametrize("kernel", ["1", "0"])
@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_an_average_that_overflows_is_refused_on_the_kernel_and_on_torch(tmp_path, monkeypatch, kernel, out_dtype):
    """Finite inputs whose bias correction overflows float32 (θ_t − θ0 = 6e38): neither path writes Inf."""
    monkeypatch.setenv("BEMA_OFFLINE_KERNEL", kernel)
    shapes = {"a.weight": (4, 3), "b.weight": (5,)}
    run_dir, base_dir, weights = make_run(tmp_path, [1, 2], shapes=shapes, dtype=torch.bfloat16)
    from synthetic import save_weights

    weights[0]["b.weight"] = torch.full((5,), -3e38, dtype=torch.bfloat16)
    weights[2]["b.weight"] = torch.full((5,), 3e38, dtype=torch.bfloat16)
    save_weights(base_dir, weights[0])
    save_weights(run_dir / "checkpoint-2", weights[2])
    with pytest.raises(DataError, match="averaging tensor 'b.weight' overflowed to Inf or NaN; try --accum-dtype float64"):
        average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=1), base_model=base_dir, dtype=out_dtype)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(kernels.kernel_name() is None, reason="the C kernel was not built")
def test_a_budget_too_small_to_replay_goes_step_by_step_with_the_same_bits(tmp_path):
    """A replayed group holds every step's bytes; where one kernel block of that does not fit the budget, the
    engine goes step by step on torch's ops instead, and writes the same bytes."""
    from bema_offline.engine.engine import Engine

    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3, 4], extra={"position_ids": torch.arange(9)})
    plan = average(run_dir, tmp_path / "o", schedule=BEMASchedule(update_freq=1), base_model=base_dir, dry_run=True).plan
    replayed, stepped = CollectingSink(), CollectingSink()
    large, small = Engine(plan, replayed, max_memory=2**20, threads=1), Engine(plan, stepped, max_memory=8192, threads=1)
    assert not large.uses_torch and small.uses_torch
    large.run()
    small.run()
    assert replayed.tensors == stepped.tensors and len(replayed.tensors) == len(plan.tensors)
