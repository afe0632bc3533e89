"""The C kernel (`_kernel.c`): the arithmetic of one step on float32 or bf16 values in memory, with the bits of
torch's ops (tests/test_kernel.py), and without torch:

- the EMA update, `ema.mul_(1 - beta).add_(theta, alpha=beta)` for each EMA: one pass over memory that reads
  `theta` once for all the EMAs and upcasts bf16 on the fly (torch needs an upcast pass plus two passes per EMA);
- an output, `ema + alpha * (theta - theta0)` (or the EMA) rounded to the output dtype, with a finiteness check:
  one pass instead of five;
- whether a tensor still equals θ0 (a frozen parameter), without upcasting it;
- the upcast of a checkpoint to float32 (θ0), a copy cast to the output dtype, and a finiteness check.

The kernel is built at install time where a C compiler is found. It covers float32 state, float32 or bf16 inputs
and outputs, on the CPU; the engine takes torch's ops for everything else (fp16 or fp64, mixed-dtype groups,
GPUs). Because this module never imports torch, a run the kernel covers never loads it (seconds at startup).

The kernel takes raw addresses: every function here checks the lengths and dtypes of its `Floats` first.

Set `BEMA_OFFLINE_KERNEL=0` to run torch's ops even where the kernel is built (to compare the two).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass

try:
    from . import _kernel
except ImportError:  # built without a C compiler
    _kernel = None

KERNEL_DTYPES = ("F32", "BF16")  # safetensors names of the dtypes the kernel reads and writes


def kernel_name() -> str | None:
    """Which build of the C kernel runs ("avx2+fma" or "generic"), or None: not built, or turned off."""
    if _kernel is None or os.environ.get("BEMA_OFFLINE_KERNEL", "1") == "0":
        return None
    return _kernel.IMPL


@dataclass(frozen=True)
class Floats:
    """`numel` contiguous float32 (or bf16) values at `address` in CPU memory."""

    address: int
    numel: int
    bf16: bool = False

    @property
    def nbytes(self) -> int:
        return self.numel * (2 if self.bf16 else 4)

    def part(self, start: int, stop: int) -> Floats:
        """Elements [start, stop)."""
        if not 0 <= start <= stop <= self.numel:
            raise ValueError(f"elements [{start}, {stop}) of {self.numel}")
        return Floats(self.address + start * (2 if self.bf16 else 4), stop - start, self.bf16)


def update_emas(theta: Floats, emas: Sequence[Floats], betas: Sequence[float]) -> None:
    """Advance each float32 EMA by one step towards `theta`, in one pass: TRL's `ema.mul_(1 - beta).add_(theta,
    alpha=beta)`, with its rounding."""
    for ema in emas:
        _require("update_emas", "each EMA", ema, theta.numel, float32=True)
    updates = [(ema.address, 1 - beta, beta) for ema, beta in zip(emas, betas, strict=True)]
    _kernel.ema_update(theta.address, theta.bf16, theta.numel, updates)


def write_output(theta: Floats, theta0: Floats, ema: Floats, alpha: float | None, out: Floats) -> bool:
    """`out = ema + alpha * (theta - theta0)` as torch computes it on float32 (or `out = ema` when `alpha` is None),
    rounded to `out`'s dtype, in one pass. Returns whether every value of `out` is finite."""
    _require("write_output", "theta0", theta0, theta.numel, float32=True)
    _require("write_output", "ema", ema, theta.numel, float32=True)
    _require("write_output", "out", out, theta.numel)
    return _kernel.bema_output(
        theta.address, theta.bf16, theta0.address, ema.address, theta.numel, alpha is not None, alpha or 0.0,
        out.address, out.bf16,
    )


def store(values: Floats, out: Floats) -> bool:
    """`out = values` (float32), rounded to `out`'s dtype as torch's `copy_` rounds; returns whether every value of
    `out` is finite."""
    _require("store", "values", values, out.numel, float32=True)
    return _kernel.bema_output(values.address, False, values.address, values.address, out.numel, False, 0.0, out.address, out.bf16)


def upcast(theta: Floats, into: Floats) -> None:
    """`into = theta` widened to float32 (exact)."""
    _require("upcast", "into", into, theta.numel, float32=True)
    _kernel.upcast(theta.address, theta.bf16, into.address, theta.numel)


def copy(values: Floats, into: Floats) -> None:
    """`into = values`, same dtype."""
    _require("copy", "into", into, values.numel, float32=not values.bf16)
    ctypes.memmove(into.address, values.address, values.nbytes)


def equals(theta: Floats, theta0: Floats) -> bool:
    """`torch.equal(theta.float(), theta0)` without the upcast, stopping at the first difference (`theta0` float32)."""
    _require("equals", "theta0", theta0, theta.numel, float32=True)
    return _kernel.equals(theta.address, theta.bf16, theta0.address, theta.numel)


def all_finite(values: Floats) -> bool:
    """Whether no value is Inf or NaN."""
    return _kernel.all_finite(values.address, values.bf16, values.numel)


def _require(function: str, name: str, values: Floats, numel: int, *, float32: bool = False) -> None:
    """Refuse what the kernel cannot read safely: it takes raw addresses, so lengths and dtypes are checked here."""
    if values.numel != numel or (float32 and values.bf16):
        raise ValueError(f"{function}: {name} must hold {numel} {'float32' if float32 else 'float32 or bf16'} values")
