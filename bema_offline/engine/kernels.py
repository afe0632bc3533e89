"""The C kernel (`_kernel.c`): BEMA's arithmetic on float32 or bf16 values in memory, with the bits of torch's ops
(tests/engine/test_kernel.py and test_kernel_ops.py), and without torch:

- `Program`: a whole group replayed at once, from every step's values already in memory. The EMA updates
  (`ema.mul_(1 - beta).add_(theta, alpha=beta)`), the weighted sums of the other averages (`torch.mul(theta, w)`,
  then `acc.add_(theta, alpha=w)` per further step) and the outputs (`ema + alpha * (theta - theta0)`, an EMA or a
  sum, rounded to the output dtype, with a finiteness check) run block by block, so each block of every EMA and
  sum stays in L1 from the first step to the last: memory traffic is the checkpoints' bytes and the outputs',
  whatever the number of outputs (torch needs an upcast pass plus three passes per EMA and step);
- whether a tensor still equals θ0 (a frozen parameter), without upcasting it;
- the upcast of a checkpoint to float32 (θ0), a copy cast to the output dtype, and a finiteness check.

The kernel is built at install time where a C compiler is found. It covers float32 state, float32 or bf16 inputs
and outputs, on the CPU; the engine takes torch's ops for everything else (fp16 or fp64, mixed-dtype groups,
GPUs). Because this module never imports torch, a run the kernel covers never loads it (seconds at startup).

The kernel takes raw addresses: every function here checks the lengths and dtypes of its `Floats` first.

Set `BEMA_OFFLINE_KERNEL=0` to run torch's ops even where the kernel is built (to compare the two), or
`BEMA_OFFLINE_KERNEL=generic` (read at import) to run the kernel's generic loops on a CPU with AVX2 and FMA.
"""

from __future__ import annotations

import math
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


class Program:
    """A group's replay on the kernel: ops added in step order, then `run()` executes them block by block over the
    group's elements (see `_kernel.c`), so the EMAs and sums stay in L1 from the first step to the last.

    A slot holds an EMA (`start`, then `update`s) or a weighted sum (`scale`, then `accumulate`s); `output` writes
    either.

    Args:
        thetas (`Sequence[Floats]`): each read step's values, float32 or bf16, all of one length.
        slots (`int`): how many EMAs and sums the ops name.

    Example (a uniform average of three steps, `values` being their `Floats` and `out` a float32 or bf16 buffer):

    ```python
    >>> program = Program(values, slots=1)
    >>> program.scale(0, 0, 1 / 3)
    >>> program.accumulate(0, 1, 1 / 3)
    >>> program.accumulate(0, 2, 1 / 3)
    >>> program.output(0, 2, None, None, out)
    >>> program.run()  # whether every value written is finite
    [True]
    ```
    """

    def __init__(self, thetas: Sequence[Floats], slots: int) -> None:
        self.numel = thetas[0].numel if thetas else 0
        for theta in thetas:
            _require("Program", "each step's values", theta, self.numel)
        self.steps = [(theta.address, theta.bf16) for theta in thetas]
        self.slots = slots
        self.ops: list[tuple] = []

    def start(self, slot: int, theta0: Floats) -> None:
        """EMA `slot` starts as `theta0` (float32)."""
        self._check(slot)
        _require("Program.start", "theta0", theta0, self.numel, float32=True)
        self.ops.append((0, slot, theta0.address))

    def update(self, slot: int, step: int, beta: float) -> None:
        """TRL's `ema.mul_(1 - beta).add_(theta, alpha=beta)` towards the values of step index `step`."""
        self._check(slot, step)
        self.ops.append((1, slot, step, 1 - beta, beta))

    def scale(self, slot: int, step: int, weight: float) -> None:
        """Start a weighted sum: `acc = theta * fl32(weight)`, the bits of `torch.mul(theta, weight)` on float32,
        with theta the values of step index `step`."""
        self._check(slot, step)
        self.ops.append((3, slot, step, _weight("Program.scale", weight)))

    def accumulate(self, slot: int, step: int, weight: float) -> None:
        """Add a term to a weighted sum: `acc = fma(theta, fl32(weight), acc)`, the bits of
        `acc.add_(theta, alpha=weight)` on float32."""
        self._check(slot, step)
        self.ops.append((4, slot, step, _weight("Program.accumulate", weight)))

    def output(self, slot: int, step: int, theta0: Floats | None, alpha: float | None, out: Floats) -> None:
        """`out = ema + alpha * (theta - theta0)` as torch computes it on float32 (or `out = ema` when `alpha` is
        None: an EMA or a weighted sum as it stands), with theta the values of step index `step`, rounded to `out`'s
        dtype. `theta0` may be None when `alpha` is."""
        self._check(slot, step)
        if alpha is not None or theta0 is not None:
            _require("Program.output", "theta0", theta0, self.numel, float32=True)
        _require("Program.output", "out", out, self.numel)
        address = theta0.address if theta0 is not None else 0
        self.ops.append((2, slot, step, address, alpha is not None, alpha or 0.0, out.address, out.bf16))

    def run(self) -> list[bool]:
        """Execute the ops; for each output, in order, whether every value it wrote is finite."""
        return list(_kernel.replay(self.numel, self.steps, self.ops, self.slots))

    def _check(self, slot: int, step: int = 0) -> None:
        if not (0 <= slot < self.slots and 0 <= step < len(self.steps)):
            raise ValueError(f"Program: EMA {slot} of {self.slots} or step {step} of {len(self.steps)} out of range")


def store(values: Floats, out: Floats) -> bool:
    """`out = values` (float32), rounded to `out`'s dtype as torch's `copy_` rounds; returns whether every value of
    `out` is finite."""
    _require("store", "values", values, out.numel, float32=True)
    return _kernel.store(values.address, out.address, out.bf16, out.numel)


def upcast(theta: Floats, into: Floats) -> None:
    """`into = theta` widened to float32 (exact)."""
    _require("upcast", "into", into, theta.numel, float32=True)
    _kernel.upcast(theta.address, theta.bf16, into.address, theta.numel)


def equals(theta: Floats, theta0: Floats) -> bool:
    """`torch.equal(theta.float(), theta0)` without the upcast, stopping at the first difference (`theta0` float32)."""
    _require("equals", "theta0", theta0, theta.numel, float32=True)
    return _kernel.equals(theta.address, theta.bf16, theta0.address, theta.numel)


def all_finite(values: Floats) -> bool:
    """Whether no value is Inf or NaN."""
    return _kernel.all_finite(values.address, values.bf16, values.numel)


_FLOAT32_MAX = 3.4028234663852886e38


def _weight(function: str, weight: float) -> float:
    """A weight the kernel rounds to float32: finite there (a larger one would not round to a float32 at all)."""
    weight = float(weight)
    if not (math.isfinite(weight) and abs(weight) <= _FLOAT32_MAX):
        raise ValueError(f"{function}: the weight {weight!r} is not a finite float32")
    return weight


def _require(function: str, name: str, values: Floats | None, numel: int, *, float32: bool = False) -> None:
    """Refuse what the kernel cannot read safely: it takes raw addresses, so lengths and dtypes are checked here."""
    if values is None or values.numel != numel or (float32 and values.bf16):
        raise ValueError(f"{function}: {name} must hold {numel} {'float32' if float32 else 'float32 or bf16'} values")
