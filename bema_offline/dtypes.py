"""Tensor dtypes by their safetensors names, with what the rest of the package needs to know of each.

torch is imported only where a tensor is made (`Dtype.torch`): a run that the C kernel covers never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dtype:
    """A safetensors dtype: its name in headers, its size, and torch's name for it.

    `finite_max` is the largest finite value of a float dtype: a value beyond it cannot be stored (bf16, fp16 and
    fp32 overflow to Inf; torch's casts to float8 saturate silently, so the engine checks the range itself).
    """

    name: str
    itemsize: int
    is_float: bool
    torch_name: str
    finite_max: float | None = None

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, Dtype] = {
    dtype.name: dtype
    for dtype in (
        Dtype("F64", 8, True, "float64", 1.7976931348623157e308),
        Dtype("F32", 4, True, "float32", 3.4028234663852886e38),
        Dtype("F16", 2, True, "float16", 65504.0),
        Dtype("BF16", 2, True, "bfloat16", 3.3895313892515355e38),
        Dtype("F8_E4M3", 1, True, "float8_e4m3fn", 448.0),
        Dtype("F8_E5M2", 1, True, "float8_e5m2", 57344.0),
        Dtype("I64", 8, False, "int64"),
        Dtype("I32", 4, False, "int32"),
        Dtype("I16", 2, False, "int16"),
        Dtype("I8", 1, False, "int8"),
        Dtype("U64", 8, False, "uint64"),
        Dtype("U32", 4, False, "uint32"),
        Dtype("U16", 2, False, "uint16"),
        Dtype("U8", 1, False, "uint8"),
        Dtype("BOOL", 1, False, "bool"),
    )
}
# the `--dtype` and `--accum-dtype` names, as torch and config.json spell them
FLOAT_DTYPES = {"float32": "F32", "float64": "F64", "bfloat16": "BF16", "float16": "F16"}


def dtype_name(torch_dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    wanted = str(torch_dtype).removeprefix("torch.")
    return next(name for name, dtype in DTYPES.items() if dtype.torch_name == wanted)
