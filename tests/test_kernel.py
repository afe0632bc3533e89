"""The C kernel against the torch ops it replaces: the same bits, for any length, β, values and number of EMAs."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bema_offline import kernels

BUILT = kernels._kernel is not None
needs_kernel = pytest.mark.skipif(not BUILT, reason="the C kernel was not built (no C compiler at install time)")


def test_kernel_is_built_where_ci_requires_it():
    """`.ci/run` sets BEMA_REQUIRE_KERNEL=1: there the kernel must have been compiled, so that the tests below run."""
    if os.environ.get("BEMA_REQUIRE_KERNEL") != "1":
        pytest.skip("BEMA_REQUIRE_KERNEL is not set")
    assert BUILT


@needs_kernel
def test_environment_variable_turns_the_kernel_off(monkeypatch):
    assert kernels.kernel_name() in ("avx2+fma", "generic")
    monkeypatch.setenv("BEMA_OFFLINE_KERNEL", "0")
    assert kernels.kernel_name() is None


def finite_values(n: int, dtype: torch.dtype, seed: int, spread: int) -> torch.Tensor:
    """Random values over `spread` binary orders of magnitude either side of 1, with zeros, negative zeros and
    subnormals mixed in; all finite in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    mantissa = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    exponent = torch.randint(-spread, spread + 1, (n,), generator=g).double()
    values = mantissa * torch.exp2(exponent)
    special = torch.randint(0, 12, (n,), generator=g)
    values[special == 0] = 0.0
    values[special == 1] = -0.0
    values[special == 2] = 1e-40 * mantissa[special == 2]  # float32 subnormals
    values = values.to(dtype)
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@needs_kernel
@settings(max_examples=200, deadline=None)
@given(
    n=st.one_of(st.integers(0, 40), st.integers(2000, 5000)),  # both sides of the kernel's block of 2048
    betas=st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 1e-8, 0.5, 1 / 3])), min_size=1, max_size=4),
    theta_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    spread=st.sampled_from([2, 40, 125]),
    seed=st.integers(0, 2**16),
)
def test_fused_update_has_the_bits_of_torchs_ops(n, betas, theta_dtype, spread, seed):
    theta = finite_values(n, theta_dtype, seed, spread)
    emas = [finite_values(n, torch.float32, seed + 1 + k, spread) for k in range(len(betas))]
    expected = [ema.clone() for ema in emas]
    kernels.update_emas_torch(theta.float(), expected, betas)
    kernels.update_emas_fused(theta, emas, betas)
    for got, want in zip(emas, expected):
        assert torch.equal(bits(got), bits(want))


@needs_kernel
@settings(max_examples=200, deadline=None)
@given(
    n=st.one_of(st.integers(0, 40), st.integers(2000, 5000)),
    alpha=st.one_of(st.none(), st.floats(0, 50), st.sampled_from([0.0, 1.0, 0.1])),
    theta_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    spread=st.sampled_from([2, 40, 127]),
    seed=st.integers(0, 2**16),
)
def test_fused_output_has_the_bits_of_torchs_ops(n, alpha, theta_dtype, out_dtype, spread, seed):
    """The engine's torch path: `torch.mul(torch.sub(x, theta0), alpha).add_(ema)` cast to the output dtype; with
    wide values some outputs overflow to Inf, which both must write alike and the kernel must report."""
    theta = finite_values(n, theta_dtype, seed, spread)
    theta0, ema = finite_values(n, torch.float32, seed + 1, spread), finite_values(n, torch.float32, seed + 2, spread)
    values = ema if alpha is None else torch.mul(torch.sub(theta.float(), theta0), alpha).add_(ema)
    expected = values.to(out_dtype)
    out = torch.empty(n, dtype=out_dtype)
    finite = kernels.write_output_fused(theta, theta0, ema, alpha, out)
    assert finite == bool(torch.isfinite(expected).all())
    if finite:  # (NaN's bits are torch's own business; the engine refuses non-finite outputs anyway)
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    else:
        same = torch.isfinite(expected)
        assert torch.equal(out[same].view(torch.uint8), expected[same].view(torch.uint8))


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 3000),
    change=st.one_of(st.none(), st.integers(0, 2999)),
    value=st.sampled_from([0.5, -0.0, float("nan"), float("inf")]),
    theta_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_equals_is_torch_equal_on_the_upcast_values(n, change, value, theta_dtype, seed):
    theta = finite_values(n, theta_dtype, seed, 10)
    theta0 = theta.float()
    if change is not None and change < n:
        theta0[change] = value if value != 0.5 else theta0[change] + 0.5
    assert kernels.equals_fused(theta, theta0) == torch.equal(theta.float(), theta0)


@needs_kernel
def test_fused_output_and_equals_refuse_what_they_do_not_cover():
    with pytest.raises(ValueError, match="write_output_fused: out must be a contiguous float32 or bfloat16 CPU tensor"):
        kernels.write_output_fused(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.5, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="equals_fused: theta0 must be a contiguous float32 CPU tensor of 4 elements"):
        kernels.equals_fused(torch.zeros(4), torch.zeros(5))


@needs_kernel
@pytest.mark.parametrize(
    "theta, ema",
    [
        (torch.zeros(8, dtype=torch.float16), torch.zeros(8)),  # fp16 input: torch's path
        (torch.zeros(8), torch.zeros(8, dtype=torch.float64)),  # fp64 EMA
        (torch.zeros(8), torch.zeros(9)),  # length mismatch
        (torch.zeros(16)[::2], torch.zeros(8)),  # not contiguous
    ],
)
def test_fused_update_refuses_what_it_does_not_cover(theta, ema):
    with pytest.raises(ValueError, match="update_emas_fused"):
        kernels.update_emas_fused(theta, [ema], [0.5])


def test_kernel_applies_to_float32_emas_of_bf16_or_float32_inputs():
    assert kernels.kernel_applies(torch.bfloat16, torch.float32)
    assert kernels.kernel_applies(torch.float32, torch.float32)
    assert not kernels.kernel_applies(torch.float16, torch.float32)
    assert not kernels.kernel_applies(torch.float32, torch.float64)


def test_without_the_kernel_the_engine_runs_torchs_ops(monkeypatch, tmp_path):
    """An install without a C compiler: no `_kernel` module; averaging still works, on torch's ops."""
    from synthetic import make_run

    from bema_offline import BEMASchedule, average
    from bema_offline.engine import Engine

    monkeypatch.setattr(kernels, "_kernel", None)
    assert kernels.kernel_name() is None
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3], dtype=torch.bfloat16)
    schedule = BEMASchedule(update_freq=1)
    result = average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir, dry_run=True)
    assert not Engine(result.plan, sink=None, max_memory=2**20).fused
    average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir)
    assert (tmp_path / "out" / "model.safetensors").is_file()
