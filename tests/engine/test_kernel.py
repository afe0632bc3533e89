"""The C kernel against the torch ops it replaces: the same bits, for any length, β, values and number of EMAs."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bema_offline.engine import kernels

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


def floats(t: torch.Tensor) -> kernels.Floats:
    """The kernel's view of a contiguous float32 or bf16 CPU tensor."""
    assert t.is_contiguous() and t.dtype in (torch.float32, torch.bfloat16)
    return kernels.Floats(t.data_ptr(), t.numel(), bf16=t.dtype == torch.bfloat16)


@needs_kernel
@settings(max_examples=200, deadline=None)
@given(
    n=st.one_of(st.integers(0, 40), st.integers(500, 1600)),  # both sides of the kernel's block of 512
    steps=st.integers(2, 4),
    betas=st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 1e-8, 0.5, 1 / 3])), min_size=1, max_size=4),
    alpha=st.one_of(st.none(), st.floats(0, 50), st.sampled_from([0.0, 1.0, 0.1])),
    theta_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    spread=st.sampled_from([2, 40, 127]),
    seed=st.integers(0, 2**16),
)
def test_program_has_the_bits_of_torchs_ops(n, steps, betas, alpha, theta_dtype, out_dtype, spread, seed):
    """A replay of several steps and EMAs against TRL's ops on whole tensors: every EMA starts at θ0 (step 0) and
    is updated at every later step with its own β, and writes an output there (the EMA, or `ema + α(θ_t − θ0)` as
    the engine's torch path computes it), cast to the output dtype. Wide values overflow to Inf, which both must
    write alike and the kernel must report."""
    thetas = [finite_values(n, theta_dtype, seed + step, spread) for step in range(steps)]
    theta0 = thetas[0].float()
    program = kernels.Program([floats(theta) for theta in thetas], slots=len(betas))
    emas = [theta0.clone() for _ in betas]
    expected, outs = [], []
    for slot in range(len(betas)):
        program.start(slot, floats(theta0))
    for step in range(1, steps):
        x = thetas[step].float()
        for slot, beta in enumerate(betas):
            program.update(slot, step, beta * step / steps)
            emas[slot].mul_(1 - beta * step / steps).add_(x, alpha=beta * step / steps)
        for slot in range(len(betas)):
            out = torch.empty(n, dtype=out_dtype)
            program.output(slot, step, floats(theta0), alpha, floats(out))
            values = emas[slot] if alpha is None else torch.mul(torch.sub(x, theta0), alpha).add_(emas[slot])
            expected.append(values.to(out_dtype, copy=True))  # (not the EMA itself, which the next step updates)
            outs.append(out)
    finite = program.run()
    for got, want, ok in zip(outs, expected, finite, strict=True):
        assert ok == bool(torch.isfinite(want).all())
        same = torch.isfinite(want)  # (NaN's bits are torch's own business; the engine refuses non-finite outputs)
        assert torch.equal(got[same].view(torch.uint8), want[same].view(torch.uint8))
        assert torch.equal(got.isfinite(), same)


@needs_kernel
def test_program_refuses_what_it_cannot_run_safely():
    values = [kernels.Floats(0, 4), kernels.Floats(0, 4, bf16=True)]
    program = kernels.Program(values, slots=2)
    with pytest.raises(ValueError, match="EMA 2 of 2 or step 0 of 2 out of range"):
        program.start(2, kernels.Floats(0, 4))
    with pytest.raises(ValueError, match="EMA 0 of 2 or step 2 of 2 out of range"):
        program.update(0, 2, 0.5)
    with pytest.raises(ValueError, match="Program.start: theta0 must hold 4 float32"):
        program.start(0, kernels.Floats(0, 4, bf16=True))
    with pytest.raises(ValueError, match="Program.output: out must hold 4 float32 or bf16"):
        program.output(0, 1, kernels.Floats(0, 4), 0.5, kernels.Floats(0, 5))
    with pytest.raises(ValueError, match="Program: each step's values must hold 4"):
        kernels.Program([kernels.Floats(0, 4), kernels.Floats(0, 3)], slots=1)
    assert program.ops == []  # nothing refused was added
    with pytest.raises(ValueError, match="replay: op 0 names slot 3"):  # the C side checks too
        kernels._kernel.replay(4, [(0, False)], [(1, 3, 0, 0.5, 0.5)], 1)


@needs_kernel
@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 3000),
    theta_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    spread=st.sampled_from([2, 127]),
    special=st.one_of(st.none(), st.tuples(st.integers(0, 2999), st.sampled_from([float("inf"), -float("inf"), float("nan")]))),
    seed=st.integers(0, 2**16),
)
def test_upcast_store_and_all_finite_match_torch(n, theta_dtype, out_dtype, spread, special, seed):
    """The θ0 snapshot (`into.copy_(theta)`), the copy of a frozen slice into the output (`out.copy_(theta0)`),
    and the finiteness checks, against torch."""
    theta = finite_values(n, theta_dtype, seed, spread)
    if special is not None and special[0] < n:
        theta[special[0]] = special[1]
    theta0 = torch.empty(n)
    kernels.upcast(floats(theta), floats(theta0))
    assert torch.equal(bits(theta0), bits(theta.float())) or (special is not None and special[1] != special[1])
    assert torch.equal(theta0.isnan(), theta.isnan()) and torch.equal(theta0[~theta0.isnan()], theta.float()[~theta.isnan()])
    assert kernels.all_finite(floats(theta)) == kernels.all_finite(floats(theta0)) == bool(torch.isfinite(theta).all())
    out = torch.empty(n, dtype=out_dtype)
    finite = kernels.store(floats(theta0), floats(out))
    expected = theta0.to(out_dtype)
    assert finite == bool(torch.isfinite(expected).all()) == kernels.all_finite(floats(out))
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
    assert kernels.equals(floats(theta), floats(theta0)) == torch.equal(theta.float(), theta0)


@needs_kernel
def test_parts_address_the_right_elements():
    values = torch.arange(10, dtype=torch.bfloat16)
    part = floats(values).part(3, 7)
    into = torch.empty(4)
    kernels.upcast(part, floats(into))
    assert into.tolist() == [3.0, 4.0, 5.0, 6.0]
    with pytest.raises(ValueError):
        floats(values).part(8, 11)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kernels.equals(kernels.Floats(0, 4), kernels.Floats(0, 4, bf16=True)), "equals: theta0 must hold 4 float32"),
        (lambda: kernels.upcast(kernels.Floats(0, 4), kernels.Floats(0, 4, bf16=True)), "upcast: into"),
        (lambda: kernels.store(kernels.Floats(0, 4, bf16=True), kernels.Floats(0, 4)), "store: values"),
    ],
)
def test_the_kernel_refuses_mismatched_buffers_before_touching_memory(call, message):
    """The kernel takes raw addresses (0 here: it would crash if it read them); the checks come first."""
    with pytest.raises(ValueError, match=message):
        call()


def test_without_the_kernel_the_engine_runs_torchs_ops(monkeypatch, tmp_path):
    """An install without a C compiler: no `_kernel` module; averaging still works, on torch's ops."""
    from synthetic import make_run

    from bema_offline import BEMASchedule, average
    from bema_offline.engine.engine import Engine

    monkeypatch.setattr(kernels, "_kernel", None)
    assert kernels.kernel_name() is None
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3], dtype=torch.bfloat16)
    schedule = BEMASchedule(update_freq=1)
    result = average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir, dry_run=True)
    engine = Engine(result.plan, sink=None, max_memory=2**20)
    assert not engine.fused and engine.uses_torch
    average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir)
    assert (tmp_path / "out" / "model.safetensors").is_file()
