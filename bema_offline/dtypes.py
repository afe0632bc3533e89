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

    A value too large for a float dtype becomes Inf when torch casts it, which the engine's finiteness checks catch,
    except for float8 E4M3, which has no Inf: torch's cast clamps silently to ±448 (even Inf becomes 448).
    `saturates_beyond` is the largest magnitude that still rounds to a finite value there; the engine refuses
    larger ones itself.
    """

    name: str
    itemsize: int
    is_float: bool
    torch_name: str
    saturates_beyond: float | None = None

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, Dtype] = {
    dtype.name: dtype
    for dtype in (
        Dtype("F64", 8, True, "float64"),
        Dtype("F32", 4, True, "float32"),
        Dtype("F16", 2, True, "float16"),
        Dtype("BF16", 2, True, "bfloat16"),
        Dtype("F8_E4M3", 1, True, "float8_e4m3fn", saturates_beyond=464.0),  # 448 is its largest; 464 rounds to it
        Dtype("F8_E5M2", 1, True, "float8_e5m2"),
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
