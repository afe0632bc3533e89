"""The EMA update, `ema.mul_(1 - beta).add_(theta, alpha=beta)` for each EMA, done by torch or by the C kernel.

Both give the same bits (tests/test_kernel.py). The C kernel (`_kernel.c`, built at install time where a C
compiler is found) does it in one pass over memory, reads `theta` once for all the EMAs, and upcasts bf16 on the
fly; torch needs an upcast pass plus two passes per EMA. It covers float32 EMAs of a float32 or bf16 `theta` on
the CPU; everything else (fp16 or fp64 inputs, mixed-dtype groups, GPUs) takes torch's ops.

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
    for ema in emas:
        if ema.dtype != torch.float32 or not ema.is_contiguous() or ema.numel() != n or ema.device.type != "cpu":
            raise ValueError("update_emas_fused: EMAs must be contiguous float32 CPU tensors the size of theta")
    if theta.dtype not in _KERNEL_DTYPES or not theta.is_contiguous() or theta.device.type != "cpu":
        raise ValueError("update_emas_fused: theta must be a contiguous float32 or bf16 CPU tensor")
    updates = [(ema.data_ptr(), 1 - beta, beta) for ema, beta in zip(emas, betas, strict=True)]
    _kernel.ema_update(theta.data_ptr(), theta.dtype == torch.bfloat16, n, updates)


def update_emas_torch(theta: torch.Tensor, emas: Sequence[torch.Tensor], betas: Sequence[float]) -> None:
    """TRL's ops, one EMA after another; `theta` must already have the EMAs' dtype."""
    for ema, beta in zip(emas, betas, strict=True):
        ema.mul_(1 - beta).add_(theta, alpha=beta)
