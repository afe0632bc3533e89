"""The kernel's weighted-sum ops (`Program.scale`, `Program.accumulate`) against the torch ops they stand for, bit
for bit: `acc = torch.mul(theta, w)`, then `acc.add_(theta, alpha=w)` per further step, on float32 (bf16 inputs are
upcast first, exactly), written as float32 or bf16. Both builds of the kernel (AVX2+FMA and generic) are checked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bema_offline.engine import kernels

BUILT = kernels._kernel is not None
needs_kernel = pytest.mark.skipif(not BUILT, reason="the C kernel was not built (no C compiler at install time)")
EXAMPLES = int(os.environ.get("BEMA_KERNEL_EXAMPLES", "150"))


def finite_values(n: int, dtype: torch.dtype, seed: int, spread: int) -> torch.Tensor:
    """Random values over `spread` binary orders of magnitude either side of 1, with zeros, negative zeros and
    float32 subnormals mixed in; all finite in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    mantissa = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    values = mantissa * torch.exp2(torch.randint(-spread, spread + 1, (n,), generator=g).double())
    special = torch.randint(0, 12, (n,), generator=g)
    values[special == 0] = 0.0
    values[special == 1] = -0.0
    values[special == 2] = 1e-40 * mantissa[special == 2]
    values = values.to(dtype)
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


def floats(t: torch.Tensor) -> kernels.Floats:
    assert t.is_contiguous() and t.dtype in (torch.float32, torch.bfloat16)
    return kernels.Floats(t.data_ptr(), t.numel(), bf16=t.dtype == torch.bfloat16)


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bits wherever the expected value is finite, and non-finite in the same places (NaN's payload is torch's
    business: the engine refuses non-finite outputs)."""
    finite = torch.isfinite(want)
    return torch.equal(got[finite].view(torch.uint8), want[finite].view(torch.uint8)) and torch.equal(got.isfinite(), finite)


weights = st.one_of(
    st.floats(-4, 4, allow_subnormal=False),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1 / 3, 0.1, -0.25, 1e-30, 1.5, 2.0**100]),
)


@needs_kernel
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    n=st.one_of(st.integers(0, 40), st.integers(500, 1600)),  # both sides of the kernel's block of 512, odd tails
    dtypes=st.lists(st.sampled_from([torch.bfloat16, torch.float32]), min_size=1, max_size=4),
    sums=st.lists(st.lists(weights, min_size=1, max_size=4), min_size=1, max_size=3),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    spread=st.sampled_from([2, 40, 127]),
    seed=st.integers(0, 2**16),
)
def test_weighted_sums_have_the_bits_of_torchs_ops(n, dtypes, sums, out_dtype, spread, seed):
    """Several sums in one program, each over the steps in order (a sum with fewer weights than steps skips the
    first ones), written after every term. Wide values and weights overflow to Inf: both must write it alike, and
    the kernel must report it."""
    thetas = [finite_values(n, dtype, seed + step, spread) for step, dtype in enumerate(dtypes)]
    program = kernels.Program([floats(theta) for theta in thetas], slots=len(sums))
    outs, expected = [], []
    accs: list[torch.Tensor | None] = [None] * len(sums)
    for step, theta in enumerate(thetas):
        x = theta.float()
        for slot, slot_weights in enumerate(sums):
            first = len(thetas) - len(slot_weights)  # this sum's first step
            if step < first:
                continue
            w = slot_weights[step - first]
            if accs[slot] is None:
                program.scale(slot, step, w)
                accs[slot] = torch.mul(x, w)
            else:
                program.accumulate(slot, step, w)
                accs[slot].add_(x, alpha=w)
            out = torch.empty(n, dtype=out_dtype)
            program.output(slot, step, None, None, floats(out))
            outs.append(out)
            expected.append(accs[slot].to(out_dtype, copy=True))
    finite = program.run()
    for got, want, ok in zip(outs, expected, finite, strict=True):
        assert ok == bool(torch.isfinite(want).all())
        assert same_bits(got, want)


@needs_kernel
@settings(max_examples=EXAMPLES // 3, deadline=None)
@given(
    n=st.one_of(st.integers(1, 40), st.integers(500, 1100)),
    theta_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    beta=st.floats(0, 1),
    alpha=st.floats(0, 2),
    w=st.lists(weights, min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_one_program_replays_and_sums_each_with_the_bits_it_has_alone(n, theta_dtype, beta, alpha, w, seed):
    """A BEMA (TRL's ops) and a weighted sum share the program, its steps and its blocks; each has the bits it would
    have alone."""
    thetas = [finite_values(n, theta_dtype, seed + step, 10) for step in range(3)]
    theta0 = thetas[0].float()
    program = kernels.Program([floats(theta) for theta in thetas], slots=2)
    program.start(0, floats(theta0))
    program.scale(1, 0, w[0])
    ema, acc = theta0.clone(), torch.mul(theta0, w[0])
    for step in (1, 2):
        x = thetas[step].float()
        program.update(0, step, beta)
        program.accumulate(1, step, w[step])
        ema.mul_(1 - beta).add_(x, alpha=beta)
        acc.add_(x, alpha=w[step])
    bema_out, sum_out = torch.empty(n), torch.empty(n, dtype=torch.bfloat16)
    program.output(0, 2, floats(theta0), alpha, floats(bema_out))
    program.output(1, 2, None, None, floats(sum_out))
    finite = program.run()
    want_bema = torch.mul(torch.sub(thetas[2].float(), theta0), alpha).add_(ema)
    want_sum = acc.to(torch.bfloat16)
    assert finite == [bool(torch.isfinite(want_bema).all()), bool(torch.isfinite(want_sum).all())]
    assert same_bits(bema_out, want_bema) and same_bits(sum_out, want_sum)


@needs_kernel
def test_a_uniform_average_is_the_mean_within_float32_rounding():
    """Not bits, a sanity check of the meaning: Σ θ_i / K against the float64 mean."""
    thetas = [finite_values(2049, torch.float32, seed, 3) for seed in range(5)]
    program = kernels.Program([floats(theta) for theta in thetas], slots=1)
    for step in range(5):
        (program.scale if step == 0 else program.accumulate)(0, step, 1 / 5)
    out = torch.empty(2049)
    program.output(0, 4, None, None, floats(out))
    assert program.run() == [True]
    mean = torch.stack([t.double() for t in thetas]).mean(0)
    assert torch.allclose(out.double(), mean, rtol=0, atol=8 * 2.0**-24 * 8)


@needs_kernel
def test_weighted_ops_refuse_what_the_kernel_cannot_run():
    program = kernels.Program([kernels.Floats(0, 4), kernels.Floats(0, 4, bf16=True)], slots=1)
    for weight in (float("nan"), float("inf"), 3.5e38, -1e39):
        with pytest.raises(ValueError, match="is not a finite float32"):
            program.scale(0, 0, weight)
        with pytest.raises(ValueError, match="is not a finite float32"):
            program.accumulate(0, 1, weight)
    with pytest.raises(ValueError, match="EMA 1 of 1 or step 0"):
        program.scale(1, 0, 0.5)
    with pytest.raises(ValueError, match="EMA 0 of 1 or step 2"):
        program.accumulate(0, 2, 0.5)
    with pytest.raises(ValueError, match="Program.output: theta0 must hold 4 float32"):
        program.output(0, 1, None, 0.5, kernels.Floats(0, 4))  # a BEMA output needs its θ0
    assert program.ops == []
    with pytest.raises(ValueError, match="op 0 has a weight that is not a finite float32"):  # the C side checks too
        kernels._kernel.replay(4, [(0, False)], [(3, 0, 0, float("nan"))], 1)
    with pytest.raises(ValueError, match="op 0 names slot 2"):
        kernels._kernel.replay(4, [(0, False)], [(4, 2, 0, 0.5)], 1)


@needs_kernel
def test_the_generic_build_has_the_same_bits():
    """`BEMA_OFFLINE_KERNEL=generic` picks the generic loops at import; run the kernel's bit tests (the EMA ops' and
    the weighted sums') again under them, in a fresh process. On a CPU without AVX2 both runs are the generic build."""
    if os.environ.get("BEMA_OFFLINE_KERNEL") == "generic":
        assert kernels.kernel_name() == "generic"
        pytest.skip("this process already runs the generic build")
    tests = Path(__file__).parent
    env = {**os.environ, "BEMA_OFFLINE_KERNEL": "generic", "BEMA_KERNEL_EXAMPLES": "60"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(tests / "test_kernel_ops.py"), str(tests / "test_kernel.py"), "-k", "bits or generic or match_torch or torch_equal"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
