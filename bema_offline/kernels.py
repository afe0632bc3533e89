"""The arithmetic of one step, by torch's ops or by the C kernel (`_kernel.c`), with the same bits either way
(tests/test_kernel.py):

- the EMA update, `ema.mul_(1 - beta).add_(theta, alpha=beta)` for each EMA: the kernel does it in one pass over
  memory, reads `theta` once for all the EMAs, and upcasts bf16 on the fly; torch needs an upcast pass plus two
  passes per EMA;
- whether a tensor still equals θ0 (a frozen parameter), without upcasting it;
- an output, `ema + alpha * (theta - theta0)` (or the EMA) rounded to the output dtype, with a finiteness check:
  one pass instead of five.

The kernel is built at install time where a C compiler is found. It covers float32 state, float32 or bf16 inputs
and outputs, on the CPU; everything else (fp16 or fp64, mixed-dtype groups, GPUs) takes torch's ops.

Set `BEMA_OFFLINE_KERNEL=0` to run torch's ops even where the kernel is built (to compare the two).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

try:
    from . import _kernel
except ImportError:  # built without a C compiler
    _kernel = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernel_name() -> str | None:
    """Which build of the C kernel runs ("avx2+fma" or "generic"), or None: not built, or turned off."""
    if _kernel is None or os.environ.get("BEMA_OFFLINE_KERNEL", "1") == "0":
        return None
    return _kernel.IMPL


def kernel_applies(theta_dtype: torch.dtype, ema_dtype: torch.dtype) -> bool:
    """Whether the C kernel (where `kernel_name()` says it runs) updates CPU EMAs of `ema_dtype` from a `theta` of
    `theta_dtype`."""
    return ema_dtype == torch.float32 and theta_dtype in _KERNEL_DTYPES


def update_emas_fused(theta: torch.Tensor, emas: Sequence[torch.Tensor], betas: Sequence[float]) -> None:
    """Advance each EMA by one step towards `theta` in one pass (C kernel; see `kernel_applies`).

    Args:
        theta (`torch.Tensor`): contiguous float32 or bf16 values, on the CPU.
        emas (`Sequence[torch.Tensor]`): contiguous float32 tensors with as many elements, updated in place.
        betas (`Sequence[float]`): each EMA's β at this step.
    """
    n = theta.numel()
    _require("update_emas_fused", "theta", theta, _KERNEL_DTYPES, n)
    for ema in emas:
        _require("update_emas_fused", "each EMA", ema, (torch.float32,), n)
    updates = [(ema.data_ptr(), 1 - beta, beta) for ema, beta in zip(emas, betas, strict=True)]
    _kernel.ema_update(theta.data_ptr(), theta.dtype == torch.bfloat16, n, updates)


def output_applies(theta_dtype: torch.dtype, state_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether the C kernel (where `kernel_name()` says it runs) writes outputs of `out_dtype` from CPU state of
    `state_dtype` and a `theta` of `theta_dtype`."""
    return kernel_applies(theta_dtype, state_dtype) and out_dtype in _KERNEL_DTYPES


def write_output_fused(
    theta: torch.Tensor, theta0: torch.Tensor, ema: torch.Tensor, alpha: float | None, out: torch.Tensor
) -> bool:
    """`out = ema + alpha * (theta - theta0)` as torch computes it (or `out = ema` when `alpha` is None), rounded to
    `out`'s dtype, in one pass (C kernel; see `output_applies`). Returns whether every value of `out` is finite.

    Args:
        theta (`torch.Tensor`): contiguous float32 or bf16 values, on the CPU.
        theta0, ema (`torch.Tensor`): contiguous float32 tensors with as many elements.
        alpha (`float`, *optional*): the bias correction's α at this step; None writes the EMA.
        out (`torch.Tensor`): contiguous float32 or bf16 tensor with as many elements, overwritten.
    """
    n = theta.numel()
    for name, tensor, dtypes in (("theta", theta, _KERNEL_DTYPES), ("theta0", theta0, (torch.float32,)),
                                 ("ema", ema, (torch.float32,)), ("out", out, _KERNEL_DTYPES)):
        _require("write_output_fused", name, tensor, dtypes, n)
    bf16 = torch.bfloat16
    return _kernel.bema_output(
        theta.data_ptr(), theta.dtype == bf16, theta0.data_ptr(), ema.data_ptr(), n, alpha is not None, alpha or 0.0,
        out.data_ptr(), out.dtype == bf16,
    )


def equals_fused(theta: torch.Tensor, theta0: torch.Tensor) -> bool:
    """`torch.equal(theta.float(), theta0)` without the upcast, stopping at the first difference (C kernel; `theta`
    float32 or bf16, `theta0` float32, both contiguous on the CPU, as many elements)."""
    _require("equals_fused", "theta", theta, _KERNEL_DTYPES, theta.numel())
    _require("equals_fused", "theta0", theta0, (torch.float32,), theta.numel())
    return _kernel.equals(theta.data_ptr(), theta.dtype == torch.bfloat16, theta0.data_ptr(), theta.numel())


def _require(function: str, name: str, tensor: torch.Tensor, dtypes: Sequence[torch.dtype], numel: int) -> None:
    """Refuse what the kernel cannot read safely: it takes raw addresses, so shapes and dtypes are checked here."""
    if tensor.dtype not in dtypes or not tensor.is_contiguous() or tensor.numel() != numel or tensor.device.type != "cpu":
        allowed = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise ValueError(f"{function}: {name} must be a contiguous {allowed} CPU tensor of {numel} elements")


def update_emas_torch(theta: torch.Tensor, emas: Sequence[torch.Tensor], betas: Sequence[float]) -> None:
    """TRL's ops, one EMA after another; `theta` must already have the EMAs' dtype."""
    for ema, beta in zip(emas, betas, strict=True):
        ema.mul_(1 - beta).add_(theta, alpha=beta)
